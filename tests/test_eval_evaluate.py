"""noencore.evaluate on a tiny model: batched token statistics against a plain per-item
reference, cached reference statistics, the report files, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from noencore.errors import NoencoreError, UsageError

N_PER_SET = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from noencore.data.shards import TokenShards
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen
    from noencore.models.text import build_condition_cache

    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(11)
    n = 3 * N_PER_SET
    codes = [rng.integers(0, 2048, size=(4, int(rng.integers(9, 47)))) for _ in range(n)]
    caps = [f"caption {i % 4}" for i in range(n)]
    splits = ["forget"] * N_PER_SET + ["remain"] * N_PER_SET + ["holdout"] * N_PER_SET
    path = write_code_shards(root / "shards", codes, caps, splits)
    model = load_musicgen("tiny")
    ref = load_musicgen("tiny", seed=1)
    build_condition_cache(path / "conditions", caps, model.text_encoder, progress=False)
    sh = TokenShards(path)
    sets = {s: sh.select(split=s) for s in ("forget", "remain", "holdout")}
    return {"root": root, "path": path, "shards": sh, "sets": sets, "model": model, "ref": ref,
            "codes": codes}


@torch.no_grad()
def _per_item_reference(model, shards, cache):
    """Mean NLL and token count per item from audiocraft's own logits, one item at a time."""
    out = []
    for i in range(len(shards)):
        codes = shards.codes(i).long()[None]
        cond = model.condition_tensors(*cache.batch([shards.captions[i]]))
        o = model.lm.compute_predictions(codes, [], condition_tensors=cond)
        logp = torch.log_softmax(o.logits.float(), dim=-1)
        nll = -logp.gather(-1, codes[..., None])[..., 0]
        m = o.mask.bool()
        out.append((float(nll[m].mean().detach()), int(m.sum())))
    return out


def test_batched_stats_match_per_item_reference(env):
    from noencore.evaluation import mia
    from noencore.evaluation.token_metrics import collect_set_stats
    from noencore.models.text import ConditionCache

    cache = ConditionCache(env["path"] / "conditions")
    sh = env["sets"]["remain"]
    ref = _per_item_reference(env["model"], sh, cache)
    for bs, frames in ((4, None), (1, None), (5, 16)):
        st = collect_set_stats(env["model"], sh, cache, batch_size=bs, frames=frames,
                               precision="fp32", progress=False)
        counts = st.tokens().counts()
        got = mia.mean_nll(st.tokens())
        if frames is None:  # one window per item: exactly audiocraft's valid positions
            assert counts.tolist() == [c for _, c in ref]
            np.testing.assert_allclose(got, [m for m, _ in ref], rtol=1e-5)
        else:  # shorter windows lose the delayed codebooks' first steps at each cut
            assert np.all(counts <= np.array([c for _, c in ref]))
        assert np.isfinite(st.nll).all() and st.nll.shape == st.item.shape
        assert set(np.unique(st.codebook)) == {0, 1, 2, 3}
    bf = collect_set_stats(env["model"], sh, cache, batch_size=4, precision="bf16", progress=False)
    np.testing.assert_allclose(mia.mean_nll(bf.tokens()), [m for m, _ in ref], rtol=2e-2)


def test_evaluate_report_and_cached_reference(env, tmp_path):
    from noencore.evaluation.evaluate import evaluate

    sets = env["sets"]
    base = evaluate(env["ref"], sets, out=tmp_path / "base", progress=False, min_auc_items=3)
    assert base["models"]["before"] is None
    r = evaluate(env["model"], sets, reference=env["ref"], out=tmp_path / "after",
                 batch_size=5, progress=False, min_auc_items=3)
    cached = evaluate(env["model"], sets, reference=tmp_path / "base", batch_size=3,
                      progress=False, min_auc_items=3)
    # cached statistics of the reference give the same "before" numbers as the model itself
    for s in ("forget", "remain", "holdout"):
        assert cached["token"]["before"][s]["nll"] == pytest.approx(r["token"]["before"][s]["nll"],
                                                                    rel=1e-6)
        assert r["token"]["before"][s]["nll"] == pytest.approx(base["token"]["after"][s]["nll"],
                                                               rel=1e-6)
    for a in ("loss", "mink", "mink_muse", "minkpp", "zlib", "loss_coarse", "ref_before"):
        assert 0.0 <= r["mia"]["after"]["forget"][a] <= 1.0
    # the coarse-codebook attack reads the codebook of every saved token: recomputed by hand
    from noencore.evaluation.mia import roc_auc
    from noencore.evaluation.token_metrics import load_stats

    saved = load_stats(tmp_path / "after" / "token_stats.npz")[0]

    def coarse(st):  # per item, mean log p of its codebook-0 tokens
        return np.array([-st.nll[(st.item == i) & (st.codebook == 0)].mean()
                         for i in range(st.n_items)])

    assert r["mia"]["after"]["forget"]["loss_coarse"] == pytest.approx(
        roc_auc(coarse(saved["forget"]), coarse(saved["holdout"]), min_items=3))
    assert "ref_retrained" not in r["mia"]["after"]["forget"]  # no retrained model given
    # MUSE's privleak: the mink_muse attack against chance; the variants under their names
    assert r["privleak"]["attack"] == "mink_muse" and r["privleak"]["reference_auc"] == 0.5
    assert r["privleak"]["after"] == pytest.approx(
        (0.5 - r["mia"]["after"]["forget"]["mink_muse"]) / 0.5 * 100)
    assert r["privleak_variants"]["after"]["loss"] == pytest.approx(
        (0.5 - r["mia"]["after"]["forget"]["loss"]) / 0.5 * 100)
    assert "no CLAP checkpoint" in r["generation"]["skipped"]
    assert "needs a model retrained" in r["forget_quality"]["note"]
    from noencore.ops import cpp, cpp_available
    assert r["op_backend"] == (f"cpp ({cpp.isa()})" if cpp_available() else "torch")
    out = tmp_path / "after"
    text = (out / "report.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
    assert data["sets"]["forget"]["items"] == N_PER_SET and data["seed"] == 0
    md = (out / "report.md").read_text()
    assert "| metric | good | forget before | forget after | remain before | remain after |" in md
    assert "forget ↑, remain ~" in md and "## Verdicts" in md and "remain NLL kept" in md
    assert f"token statistics by the {r['op_backend']} backend" in md
    for png in ("nll_hist.png", "roc.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [v["criterion"] for v in r["verdicts"]][:2] == ["forget MIA AUC near chance",
                                                            "remain NLL kept"]
    # a retrained model (here: the same model) gives forget quality 1 and privleak 0
    rr = evaluate(env["model"], sets, retrained=tmp_path / "after", progress=False,
                  min_auc_items=3, batch_size=6, out=tmp_path / "vs_retrained")
    assert rr["forget_quality"]["after"] == pytest.approx(1.0)
    assert rr["forget_quality"]["n"] == {"retrained": N_PER_SET, "after": N_PER_SET}
    assert rr["privleak"]["after"] == pytest.approx(0.0, abs=1e-9)
    assert rr["privleak"]["reference_auc"] == rr["mia"]["retrained"]["forget"]["mink_muse"]
    assert rr["privleak_variants"]["after"]["minkpp"] == pytest.approx(0.0, abs=1e-9)
    # MUSE's reference attack, against the retrained model, whenever one is given
    assert 0.0 <= rr["mia"]["after"]["forget"]["ref_retrained"] <= 1.0
    assert "ref_retrained" not in rr["mia"]["retrained"]["forget"]
    md = (tmp_path / "vs_retrained" / "report.md").read_text()
    assert "| privleak (MUSE) | Min-K% (MUSE: k=40%, last token out) |" in md
    assert "| privleak_minkpp | Min-K%++ (k=20%) |" in md
    assert f"(n = {N_PER_SET} vs {N_PER_SET} items)" in md  # beside the KS p-value


def test_dataset_inference_and_strongest_attack_against_the_retrained_model(env, tmp_path):
    """Dataset inference for every role (after, before, retrained: one test, one split of
    the items, on each model's statistics), the strongest attack's AUC gap to the
    retrained model, their verdicts and report.md lines."""
    from noencore.evaluation.evaluate import evaluate

    sets = env["sets"]
    gold = evaluate(env["ref"], sets, out=tmp_path / "gold", progress=False, min_auc_items=3)
    r = evaluate(env["model"], sets, reference=env["ref"], retrained=tmp_path / "gold",
                 out=tmp_path / "after", progress=False, min_auc_items=3)
    di = r["dataset_inference"]
    assert di["features"] == ["loss", "mink", "mink_muse", "minkpp", "zlib", "loss_coarse"]
    for role in ("after", "before", "retrained"):
        assert 0.0 <= di[role]["p_value"] <= 1.0, role
        assert (di[role]["n_suspect"], di[role]["n_validation"]) == (N_PER_SET, N_PER_SET)
    # the retrained model's entry is the test of its own evaluation (here: the reference)
    assert di["retrained"] == di["before"] == gold["dataset_inference"]["after"]
    vs = r["mia"]["vs_retrained"]
    after, retr = r["mia"]["after"]["forget"], r["mia"]["retrained"]["forget"]
    gaps = {a: abs(after[a] - retr[a]) for a in di["features"]}
    assert vs["per_attack"] == pytest.approx(gaps)
    assert vs["gap"] == pytest.approx(max(gaps.values())) and vs["worst_attack"] in gaps
    assert gaps[vs["worst_attack"]] == pytest.approx(vs["gap"])
    criteria = {v["criterion"]: v for v in r["verdicts"]}
    auc = criteria["forget MIA AUC near the retrained model's, every attack"]
    assert auc["value"] == pytest.approx(vs["gap"]) and auc["pass"] == (vs["gap"] <= 0.05)
    dv = criteria["dataset inference (forget set as a whole vs holdout)"]
    assert dv["value"] == di["after"]["p_value"]
    assert dv["pass"] == (di["after"]["p_value"] >= min(0.05, di["retrained"]["p_value"]))
    md = (tmp_path / "after" / "report.md").read_text()
    assert "| attack | AUC after | AUC retrained | gap |" in md
    assert "dataset inference (the forget set as a whole vs the holdout" in md
    assert f"retrained {di['retrained']['p_value']:.4f} (n = 6 vs 6" in md
    # too few items per half: a note, no number, no verdict
    small = evaluate(env["model"], sets, progress=False)  # halves of 3 < 5
    assert "too small for dataset inference" in small["dataset_inference"]["after"]["note"]
    assert not any(v["criterion"].startswith("dataset inference") for v in small["verdicts"])
    nodi = evaluate(env["model"], sets, metrics=["token", "mia"], progress=False)
    assert "dataset_inference" not in nodi


def test_cached_stats_checked(env, tmp_path):
    from noencore.evaluation.evaluate import evaluate

    sets = env["sets"]
    evaluate(env["ref"], sets, out=tmp_path / "base", progress=False, min_auc_items=3)
    npz = tmp_path / "base" / "token_stats.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(NoencoreError, match="checksum"):
        evaluate(env["model"], sets, reference=tmp_path / "base", progress=False)
    evaluate(env["ref"], {"forget": sets["remain"]}, out=tmp_path / "other", progress=False)
    with pytest.raises(NoencoreError, match="other items"):
        evaluate(env["model"], {"forget": sets["forget"]}, reference=tmp_path / "other",
                 progress=False)


def test_small_sets_say_so(env):
    from noencore.evaluation.evaluate import evaluate

    sets = env["sets"]
    r = evaluate(env["model"], sets, progress=False)  # 6 items < the default minimum? no: 5
    assert "note" not in r["mia"]["after"]["forget"]
    small = {"forget": sets["forget"].select(ids=["item-0", "item-1"]),
             "holdout": sets["holdout"]}
    r = evaluate(env["model"], small, progress=False)
    assert "too small for an AUC" in r["mia"]["after"]["forget"]["note"]
    assert "loss" not in r["mia"]["after"]["forget"]
    assert r["verdicts"][0]["pass"] is None
    nohold = evaluate(env["model"], {"forget": sets["forget"]}, progress=False)
    assert "holdout" in nohold["mia"]["after"]["note"]


def test_bad_input(env, tmp_path):
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.synthetic import write_code_shards

    sets = env["sets"]
    with pytest.raises(NoencoreError, match="empty"):
        evaluate(env["model"], {"forget": env["shards"].select(split="nope")}, progress=False)
    with pytest.raises(UsageError, match="forget"):
        evaluate(env["model"], {"remain": sets["remain"]}, progress=False)
    with pytest.raises(UsageError, match="unknown metric"):
        evaluate(env["model"], sets, metrics=["loss_of_nerve"], progress=False)
    with pytest.raises(UsageError, match="CLAP checkpoint"):
        evaluate(env["model"], sets, metrics=["token", "clap"], progress=False)
    other = write_code_shards(tmp_path / "nq2", [np.zeros((2, 20), int)] * 2, ["a", "b"],
                              ["forget", "forget"])
    with pytest.raises(NoencoreError, match="n_q=2"):
        evaluate(env["model"], {"forget": other}, progress=False)
    nocond = write_code_shards(tmp_path / "nocond", [np.zeros((4, 20), int)] * 2, ["a", "b"],
                               ["forget", "forget"])
    with pytest.raises(NoencoreError, match="text-condition cache"):
        evaluate(env["model"], {"forget": str(nocond)}, progress=False)
    with pytest.raises(NoencoreError, match="CLAP checkpoint .* not found"):
        evaluate(env["model"], sets, clap=tmp_path / "missing.pt", progress=False)


def test_criteria_parse():
    from noencore.evaluation.report import Criteria

    c = Criteria.parse("forget_auc_tol=0.1, remain_nll_rel=0.05")
    assert (c.forget_auc_tol, c.remain_nll_rel, c.privleak_tol) == (0.1, 0.05, 10.0)
    with pytest.raises(ValueError, match="unknown verdict criterion"):
        Criteria.parse("speed=3")


def test_generation_batched_and_continuation(env):
    """Batched generation is deterministic per seed and has the asked shape; a greedy
    continuation of the model's own greedy output matches it exactly (rate 1)."""
    from noencore.evaluation.generation import (
        GenerationConfig,
        _attributes,
        continuation_match,
        generate_codes,
    )

    model = env["model"]
    cfg = GenerationConfig(frames=12, batch_size=2, seed=5, cfg_coef=3.0)
    caps = ["caption 0", "caption 1", "caption 2"]
    a = generate_codes(model, caps, cfg, progress=False)
    b = generate_codes(model, caps, cfg, progress=False)
    assert a.shape == (3, 4, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and int(a.min()) >= 0 and int(a.max()) < 2048
    # greedy output of the model, then ask it to continue its own prefix
    greedy = model.lm.generate(conditions=_attributes(model, caps), max_gen_len=14,
                               use_sampling=False, cfg_coef=3.0).cpu()
    cont = GenerationConfig(batch_size=2, cfg_coef=3.0)
    rates = continuation_match(model, greedy[..., :8], greedy[..., 8:14], caps, cont)
    np.testing.assert_allclose(rates, 1.0)
    wrong = (greedy[..., 8:14] + 1) % 2048
    np.testing.assert_allclose(continuation_match(model, greedy[..., :8], wrong, caps, cont), 0.0)


def test_generation_refuses_a_model_without_conditions_and_an_item_without_caption(env):
    """Generation answers captions: a model with no text condition, or an item with no
    caption, is refused with the model or the item named, before anything is generated."""
    import copy

    from noencore.errors import NoencoreError
    from noencore.evaluation.generation import GenerationConfig, generate_codes

    cfg = GenerationConfig(frames=4, batch_size=2)
    model = env["model"]
    with pytest.raises(NoencoreError, match=r"item 'b-2' has no caption.*manifest"):
        generate_codes(model, ["caption 0", "  "], cfg, progress=False, ids=["a-1", "b-2"])
    unconditioned = copy.copy(model)
    unconditioned.text_attribute = None
    with pytest.raises(NoencoreError, match="takes no text condition.*leave out the generation"):
        generate_codes(unconditioned, ["caption 0"], cfg, progress=False)


def test_cli_evaluate(env, tmp_path, capsys):
    import noencore
    from noencore.cli import main

    assert noencore.evaluate.__module__ == "noencore.evaluation.evaluate"
    out = tmp_path / "cli"
    rc = main(["evaluate", str(env["path"]), "--model", "tiny", "--out", str(out), "--quiet",
               "--min-auc-items", "3", "--batch-size", "4",
               "--verdict", "forget_auc_tol=0.5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PASS forget MIA AUC near chance" in text  # tolerance 0.5 always passes
    assert "no reference model" in text and (out / "report.md").is_file()
    assert json.loads((out / "report.json").read_text())["criteria"]["forget_auc_tol"] == 0.5
    assert main(["evaluate", str(env["path"]), "--model", "tiny", "--out", str(out),
                 "--forget-split", "nope", "--quiet"]) == 1
    assert "forget set is empty" in capsys.readouterr().err
    assert main(["evaluate", str(env["path"]), "--model", "tiny", "--out", str(out),
                 "--verdict", "speed=1", "--quiet"]) == 2


def test_retrained_with_another_vocabulary_is_refused_by_name(env):
    import copy

    from noencore.evaluation.evaluate import evaluate

    other = copy.copy(env["ref"])  # the same weights, claiming another vocabulary
    other.card = 1024
    with pytest.raises(NoencoreError, match=r"retrained model .*card 1024 \(model 2048\).*"
                                            r"retrain from the same base model"):
        evaluate(env["model"], env["sets"], retrained=other, progress=False)
