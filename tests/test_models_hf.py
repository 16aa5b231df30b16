"""MusicGen in the transformers format: parity with transformers, conversions both ways,
a run of ``noencore unlearn`` and back into transformers, and bad input.

Every model is a tiny random-weight one saved to disk as transformers saves it
(``tiny_hf.build_tiny_hf``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from noencore.errors import NoencoreError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import random_items, write_shards  # noqa: E402
from tiny_hf import build_tiny_hf  # noqa: E402

# one caption with padding in a batch, one without, and the empty (unconditional) one
CAPTIONS = ["a calm piano piece with soft strings and a slow walking bass", "jazz", ""]


class _Batch:
    def __init__(self, codes, mask):
        self.codes, self.mask = codes, mask


@pytest.fixture(scope="module")
def hf_env(tmp_path_factory):
    """(folder, MusicGenModel loaded from it, its condition cache, transformers model)."""
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from transformers import MusicgenForConditionalGeneration

    from noencore.models import build_condition_cache, load_musicgen

    folder = build_tiny_hf(tmp_path_factory.mktemp("hf") / "musicgen")
    model = load_musicgen(str(folder))
    cache = build_condition_cache(tmp_path_factory.mktemp("cond"), CAPTIONS,
                                  model.text_encoder, progress=False)
    hf = MusicgenForConditionalGeneration.from_pretrained(folder).eval()  # eval: no dropout
    return folder, model, cache, hf


def _text_inputs(folder, captions):
    """transformers' text inputs; an empty caption is its unconditional input (all masked),
    as transformers' guidance and audiocraft's conditioner (hence the cache) make it."""
    from transformers import AutoTokenizer

    inputs = AutoTokenizer.from_pretrained(folder)(captions, return_tensors="pt", padding=True)
    for i, caption in enumerate(captions):
        if caption == "":
            inputs["attention_mask"][i] = 0
    return inputs


def _pattern_sequence(lm, codes):
    """audiocraft's delay-pattern sequence [B, K, S] of codes [B, K, T] (step 0: special)."""
    pattern = lm.pattern_provider.get_pattern(codes.shape[-1])
    return pattern.build_pattern_sequence(codes, lm.special_token_id,
                                          keep_only_valid_steps=True)[0]


def _audiocraft_vs_transformers(lm, hf, folder, caption: str, T: int = 9) -> float:
    """Max |difference| of audiocraft's ``compute_predictions`` (its own T5 conditioner)
    and transformers' logits for one caption (no padding: each library's convention
    agrees), over the delay pattern's valid positions; asserts they are within 1e-5."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    from noencore.models.adapter import pattern_index

    K = lm.num_codebooks
    codes = torch.randint(0, lm.card, (1, K, T))
    seq = _pattern_sequence(lm, codes)
    S = seq.shape[-1]
    with torch.no_grad():
        out = lm.compute_predictions(codes, [ConditioningAttributes(text={"description":
                                                                          caption})])
        ref = hf(**_text_inputs(folder, [caption]),
                 decoder_input_ids=seq[:, :, : S - 1].reshape(K, S - 1)).logits
    step, valid = pattern_index(lm, T)
    worst = 0.0
    for k in range(K):
        t = valid[k].nonzero().squeeze(1)
        torch.testing.assert_close(out.logits[0, k, t], ref[k, step[k, t]], rtol=1e-5,
                                   atol=1e-5)
        worst = max(worst, float((out.logits[0, k, t] - ref[k, step[k, t]]).abs().max()))
    return worst


@pytest.mark.parametrize("T", [1, 13])
def test_transformers_logits_equal_the_adapters(hf_env, T):
    from noencore.models.adapter import pattern_index

    folder, model, cache, hf = hf_env
    B, K = len(CAPTIONS), model.n_q
    codes = torch.randint(0, model.card, (B, K, T))
    mask = torch.rand(B, K, T) > 0.2
    seq = _pattern_sequence(model.lm, codes)
    S = seq.shape[-1]
    with torch.no_grad():
        # transformers' decoder input is the pattern sequence without its last step
        ref = hf(**_text_inputs(folder, CAPTIONS),
                 decoder_input_ids=seq[:, :, : S - 1].reshape(B * K, S - 1)).logits
        ref = ref.reshape(B, K, S - 1, -1)
        rows = model.codebook_rows(_Batch(codes, mask), cache.batch(CAPTIONS))
    step, _ = pattern_index(model.lm, T)
    worst = 0.0
    for k, r in enumerate(rows):
        assert r.hidden.shape[0] > 0 or T == 1
        ours, theirs = r.hidden @ r.weight.T, ref[r.item, k, step[k, r.time]]
        # padded captions only agree because the converted LM masks them as transformers
        # does (audiocraft attends to them: 2.5e-3 off on this model)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        if ours.numel():
            worst = max(worst, float((ours - theirs).abs().max()))
    print(f"T={T}: logits max |adapter - transformers| = {worst:.1e}")


def test_loss_and_gradients_equal_transformers_training_loss(hf_env):
    """transformers' MusicGen loss is the mean over codebooks of each codebook's mean CE
    over labels that are not ``pad_token_id``; it does not apply the delay pattern
    itself. Given the pattern's sequence as labels (its start step dropped: transformers
    prepends ``decoder_start_token_id``; positions the pattern leaves empty hold the
    special token = pad, so they are ignored), it is audiocraft's loss, which the engine
    computes with the fused op over the adapter's rows."""
    from noencore.models.hf import weight_map
    from noencore.ops import linear_ce_ascent

    folder, model, cache, hf = hf_env
    B, K, T = len(CAPTIONS), model.n_q, 11
    codes = torch.randint(0, model.card, (B, K, T))
    labels = _pattern_sequence(model.lm, codes)[:, :, 1:].transpose(1, 2)  # [B, S-1, K]
    ref = hf(**_text_inputs(folder, CAPTIONS), labels=labels).loss
    hf_params = dict(hf.named_parameters())
    names = weight_map(len(model.lm.transformer.layers), K)
    theirs = [hf_params[h] for _, hs in names for h in hs]
    ref_grads = dict(zip([h for _, hs in names for h in hs],
                         torch.autograd.grad(ref, theirs)))

    rows = model.codebook_rows(_Batch(codes, torch.ones_like(codes, dtype=torch.bool)),
                               cache.batch(CAPTIONS))
    ours = sum(linear_ce_ascent(r.hidden, r.weight, r.targets, backend="torch")
               for r in rows) / K
    lm_params = {k.replace(".mha.", "."): p for k, p in model.lm.named_parameters()}
    our_grads = dict(zip(lm_params, torch.autograd.grad(ours, list(lm_params.values()))))

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    worst = 0.0
    for ac, hs in names:
        want = torch.cat([ref_grads[h] for h in hs])
        scale = want.abs().max().clamp_min(1e-12)
        err = float((our_grads[ac] - want).abs().max() / scale)
        assert err < 1e-4, ac
        worst = max(worst, err)
    print(f"loss {float(ours.detach()):.7f} vs transformers {float(ref.detach()):.7f}; "
          f"gradients: max |ours - transformers| / max |transformers| = {worst:.1e} over "
          f"{len(names)} tensors")


def test_transformers_to_audiocraft_and_back(hf_env, tmp_path):
    """Converted weights give the same logits in audiocraft (its own loader, T5
    conditioner and ``compute_predictions``) as in transformers, for a caption without
    padding; converting back gives transformers' weights bit for bit."""
    from audiocraft.models.loaders import load_lm_model
    from transformers import MusicgenForConditionalGeneration

    from noencore.cli import main
    from noencore.models.text import register_t5

    folder, model, _, hf = hf_env
    assert main(["convert", str(folder), str(tmp_path / "ac")]) == 0
    assert {p.name for p in (tmp_path / "ac").iterdir()} >= {
        "state_dict.bin", "compression_state_dict.bin", "encodec"}
    register_t5(model.text_encoder, 32)
    lm = load_lm_model(str(tmp_path / "ac"), device="cpu").eval()
    err = _audiocraft_vs_transformers(lm, hf, folder, CAPTIONS[0])
    print(f"transformers -> audiocraft: logits max |audiocraft - transformers| = {err:.1e}")

    assert main(["convert", str(tmp_path / "ac"), str(tmp_path / "back")]) == 0
    back = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    orig = hf.state_dict()
    assert back.keys() == orig.keys()
    assert [k for k in orig if not torch.equal(orig[k], back[k])] == []


def test_audiocraft_model_to_transformers(hf_env, tmp_path, capsys):
    """An audiocraft MusicGen (the named "tiny" LM) written for transformers: its codec
    is audiocraft's own EnCodec, so a transformers EnCodec with the same codebooks is
    given; transformers then computes audiocraft's logits."""
    from transformers import MusicgenForConditionalGeneration

    from noencore.cli import main
    from noencore.models import load_musicgen, save_musicgen

    folder = hf_env[0]
    ac = load_musicgen("tiny")
    save_musicgen(ac, tmp_path / "tiny")
    assert main(["convert", str(tmp_path / "tiny"), str(tmp_path / "hf")]) == 1
    assert "is not a transformers EncodecModel" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "tiny"), str(tmp_path / "hf"), "--codec",
                 str(folder)]) == 0
    hf = MusicgenForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    err = _audiocraft_vs_transformers(ac.lm, hf, tmp_path / "hf", "jazz")
    print(f"audiocraft -> transformers: logits max |audiocraft - transformers| = {err:.1e}")


def test_unlearn_cli_round_trip_into_transformers(hf_env, tmp_path, capsys):
    """precomputed shards -> `noencore condition` -> `noencore unlearn` -> a folder that
    transformers loads and generates from; T5 and EnCodec unchanged; the unlearned model
    reads the same condition cache and evaluates."""
    from transformers import MusicgenForConditionalGeneration

    import noencore
    from noencore.cli import main
    from noencore.data.shards import TokenShards
    from noencore.models import load_musicgen

    folder, model, _, hf = hf_env
    shards = write_shards(tmp_path / "shards", random_items(2, 4, 16), codec=str(folder))
    assert main(["condition", str(shards), "--model", str(folder)]) == 0
    capsys.readouterr()
    assert main(["unlearn", "--model", str(folder), "--shards", str(shards), "--forget",
                 "forget", "--method", "graddiff", "--steps", "2", "--lr", "0.01",
                 "--batch-size", "4", "--frames", "12", "--backend", "torch",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    out = Path(summary["model_dir"])
    assert (out / "config.json").is_file() and not (out / "state_dict.bin").exists()

    back = MusicgenForConditionalGeneration.from_pretrained(out).eval()
    new, orig = back.state_dict(), hf.state_dict()
    changed = {k for k in orig if not torch.equal(orig[k], new[k])}
    assert changed and all(k.startswith(("decoder.", "enc_to_dec_proj.")) for k in changed)
    inputs = _text_inputs(out, ["a calm piano piece", "jazz"])
    with torch.no_grad():
        audio = back.generate(**inputs, max_new_tokens=6, do_sample=True, guidance_scale=3.0)
    assert audio.shape[:2] == (2, 1) and audio.shape[-1] > 0 and torch.isfinite(audio).all()

    again = load_musicgen(str(out), with_codec=False)
    assert again.text_encoder == model.text_encoder  # the same T5: the cache stays valid
    view = TokenShards(shards)
    report = noencore.evaluate(str(out), {"forget": view.select(split="forget"),
                                          "remain": view.select(split="remain")},
                               metrics=["token"], frames=12, batch_size=4, progress=False)
    assert report["token"]["after"]["forget"]["nll"] > 0


def test_codec_of_a_transformers_musicgen(hf_env):
    """`--codec FOLDER` of a transformers MusicGen: its EnCodec, the codes transformers
    computes, and the facts the shards record."""
    from noencore.data.codec import load_codec

    folder, model, _, hf = hf_env
    codec = load_codec(str(folder))
    assert (codec.n_q, codec.card, codec.frame_rate, codec.sample_rate) == (4, 2048, 50, 32000)
    assert codec.transformers_model is not None and model.codec.transformers_model is not None
    wav = 0.1 * torch.randn(2, 1, 32000 // 10)
    with torch.no_grad():
        want = hf.audio_encoder.encode(wav, bandwidth=2.2).audio_codes[0]  # [B, K, F]
    assert torch.equal(codec.encode(wav), want)


def _copy_with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_bad_input_is_refused_naming_the_file_or_value(hf_env, tmp_path):
    from noencore import unlearn
    from noencore.models import build_condition_cache, load_musicgen
    from noencore.models.text import tiny_t5_folder

    folder, model, _, _ = hf_env
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoencoreError, match="neither an audiocraft MusicGen .*nor a "
                                            "transformers MusicGen"):
        load_musicgen(str(tmp_path / "empty"))
    with pytest.raises(NoencoreError, match="model_type 't5' is not a transformers MusicGen"):
        load_musicgen(str(tiny_t5_folder()))
    # transformers' own conversions set the start token in generation_config.json only
    plain = _copy_with_config(folder, tmp_path / "generation_only",
                              lambda c: c["decoder"].pop("decoder_start_token_id"))
    assert json.loads((plain / "generation_config.json").read_text()).get(
        "decoder_start_token_id") == 2048
    assert load_musicgen(str(plain), with_codec=False).format == "hf"
    bad = _copy_with_config(folder, tmp_path / "start", lambda c: c["decoder"].update(
        decoder_start_token_id=0))
    with pytest.raises(NoencoreError, match=r"config.json: decoder.decoder_start_token_id is "
                                            r"0, not the special token 2048"):
        load_musicgen(str(bad))
    bad = _copy_with_config(folder, tmp_path / "books", lambda c: c["decoder"].update(
        num_codebooks=8))
    with pytest.raises(NoencoreError, match="decoder.num_codebooks 8 differs from the "
                                            "EnCodec's 4 codebooks"):
        load_musicgen(str(bad))
    bad = _copy_with_config(folder, tmp_path / "vocab", lambda c: c["decoder"].update(
        vocab_size=1024))
    with pytest.raises(NoencoreError, match=r"vocab/config.json: .*decoder.vocab_size 1024 "
                                            r"differs from the EnCodec's codebook_size 2048"):
        load_musicgen(str(bad))
    bad = tmp_path / "no_tokenizer"
    shutil.copytree(folder, bad, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(NoencoreError, match="no T5 tokenizer files"):
        load_musicgen(str(bad))

    # shards of another codec, a cache of another text encoder
    kw = dict(forget="forget", steps=1, batch_size=2, frames=8, progress=False)
    other = write_shards(tmp_path / "s1024", random_items(1, 1, 12, card=1024), card=1024)
    with pytest.raises(NoencoreError, match=r"s1024: shards .* do not match model .*card 1024 "
                                            r"vs model 2048"):
        unlearn(model, other, **kw)
    two = [(i, c[:, :2], cap, split) for i, c, cap, split in random_items(1, 1, 12)]
    other = write_shards(tmp_path / "s2books", two, n_q=2)
    with pytest.raises(NoencoreError, match=r"s2books: shards .* do not match model .*n_q 2 "
                                            r"vs model 4"):
        unlearn(model, other, **kw)
    shards = write_shards(tmp_path / "s", random_items(1, 1, 12))
    build_condition_cache(shards / "conditions", ["forget song 0", "remain piece 0"],
                          str(tiny_t5_folder()), progress=False)
    with pytest.raises(NoencoreError, match="text conditions were computed with"):
        unlearn(model, shards, **kw)
