"""Token shards record the codec that made them (its name, a digest of its weights and the
codes of a fixed probe signal); ``unlearn`` and ``evaluate`` refuse a model whose codec
tokenises differently, unless told so explicitly, and a run records what it checked."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import soundfile as sf
import torch
from test_data_corpus import music, one_torch_thread  # noqa: F401 (autouse fixture)

from noencore.errors import NoencoreError

OPTS = dict(segment_seconds=0.5, batch_size=2, workers=0, progress=False)


def _other_codec():
    """The tiny codec with every weight moved by a few per cent: the same architecture
    and vocabulary, another tokenisation."""
    from noencore.data.codec import load_codec

    codec = load_codec("tiny")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in codec.model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return codec


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four 1 s tracks (two to forget), shards by the tiny codec and by another codec
    saved as an audiocraft checkpoint."""
    from noencore.data.precompute import precompute

    root = tmp_path_factory.mktemp("trust_codec")
    rows = []
    for i in range(4):
        sf.write(root / f"t{i}.wav", music(32000, 1, 1.0, 40 + i), 32000)
        rows.append({"id": f"t{i}", "path": f"t{i}.wav", "caption": f"piece {i}",
                     "split": "forget" if i < 2 else "remain"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _other_codec().save_audiocraft(root / "other_codec")
    precompute(root / "m.jsonl", root / "tiny", codec="tiny", **OPTS)
    precompute(root / "m.jsonl", root / "other", codec=str(root / "other_codec"), **OPTS)
    return root


def test_the_identity_is_stable_and_tells_codecs_apart(corpus):
    from noencore.data.codec import load_codec, same_codec

    a, b = load_codec("tiny").identity(), load_codec("tiny").identity()
    assert a == b and len(a["weights_sha256"]) == 64 and a["name"] == "tiny"
    probe = torch.tensor(a["probe_codes"])
    assert probe.shape == (4, 50)  # 1 s at 50 frames/s, 4 codebooks
    assert all(len(set(row.tolist())) > 10 for row in probe)  # the probe uses many codes
    other = load_codec(str(corpus / "other_codec")).identity()
    assert other["weights_sha256"] != a["weights_sha256"]
    same, agree = same_codec(a, other)
    assert not same and agree < 0.2
    # other names for the same weights (another format): the probe codes decide
    renamed = {**a, "weights_sha256": "0" * 64, "name": "elsewhere"}
    assert same_codec(a, renamed) == (True, 1.0)
    # a code or two flipped by another CPU's rounding still counts as the same codec
    flipped = probe.clone()
    flipped[0, :3] = (flipped[0, :3] + 1) % 2048
    assert same_codec(a, {**renamed, "probe_codes": flipped.tolist()})[0]
    assert not same_codec(a, {**renamed, "probe_codes": [[1, 2]]})[0]  # another shape


def test_shards_record_the_codec_identity(corpus):
    from noencore.data.codec import load_codec
    from noencore.data.shards import TokenShards

    tiny, other = TokenShards(corpus / "tiny"), TokenShards(corpus / "other")
    assert tiny.header.identity == load_codec("tiny").identity()
    assert other.header.identity["name"] == str(corpus / "other_codec")
    assert other.header.identity["weights_sha256"] != tiny.header.identity["weights_sha256"]


def _model():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", overrides={"transformer_lm": {"num_layers": 1}})


def _copy_with_conditions(src, tmp_path, model):
    from noencore.data.shards import TokenShards
    from noencore.models import build_condition_cache

    path = tmp_path / src.name
    shutil.copytree(src, path)
    build_condition_cache(path / "conditions", TokenShards(path).captions,
                          model.text_encoder, progress=False)
    return path


def test_unlearn_refuses_shards_of_another_codec_unless_allowed(corpus, tmp_path):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore import unlearn

    model = _model()
    path = _copy_with_conditions(corpus / "other", tmp_path, model)
    run = dict(forget="forget", remain="remain", method="ga", steps=1, frames=25,
               batch_size=4, progress=False, device="cpu", backend="torch")
    with pytest.raises(NoencoreError, match=rf"{path}: shards were encoded with codec "
                       rf"'{corpus / 'other_codec'}', which tokenises differently from "
                       r"'tiny''s codec 'tiny' \(\d+% of the probe codes agree, 90% needed\); "
                       r"precompute the shards with the model's codec \(--codec\), or give "
                       r"--allow-codec-mismatch"):
        unlearn(model, path, out=tmp_path / "refused", **run)
    assert model.requests == [] and not (tmp_path / "refused" / "model").exists()
    with pytest.warns(UserWarning, match="allowed by --allow-codec-mismatch"):
        res = unlearn(model, path, out=tmp_path / "allowed", allow_codec_mismatch=True, **run)
    rec = res.model.requests[-1]["codec"]
    assert rec["matched_model"] is False and "allowed" in rec["note"]
    assert rec["weights_sha256"] == load_other_digest(corpus)


def load_other_digest(corpus):
    return json.loads((corpus / "other" / "header.json").read_text())[
        "codec_identity"]["weights_sha256"]


def test_a_matching_codec_is_recorded_as_matched(corpus, tmp_path):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path / "nc_cache"))
    from noencore import unlearn

    model = _model()
    path = _copy_with_conditions(corpus / "tiny", tmp_path, model)
    res = unlearn(model, path, forget="forget", remain="remain", method="ga", steps=1,
                  frames=25, batch_size=4, progress=False, device="cpu", backend="torch")
    assert res.model.requests[-1]["codec"] == {
        "name": "tiny", "weights_sha256": model.codec.identity()["weights_sha256"],
        "matched_model": True}


def test_evaluate_refuses_shards_of_another_codec_unless_allowed(corpus, tmp_path):
    from noencore import evaluate
    from noencore.data.shards import TokenShards

    model = _model()
    path = _copy_with_conditions(corpus / "other", tmp_path, model)
    shards = TokenShards(path)
    sets = {"forget": shards.select(split="forget"), "remain": shards.select(split="remain")}
    with pytest.raises(NoencoreError, match=r"shards were encoded with codec .* tokenises "
                       r"differently .* give --allow-codec-mismatch"):
        evaluate(model, sets, metrics=["token"], progress=False)
    res = evaluate(model, sets, metrics=["token"], progress=False, allow_codec_mismatch=True)
    assert any("allowed by --allow-codec-mismatch" in n for n in res["notes"])


def test_precompute_refuses_to_add_with_other_weights_under_the_same_spec(corpus, tmp_path):
    from noencore.data.codec import load_codec
    from noencore.data.precompute import precompute

    ckpt = tmp_path / "codec"
    load_codec("tiny").save_audiocraft(ckpt)
    rows = (corpus / "m.jsonl").read_text().splitlines()
    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps({**json.loads(r), "path": str(corpus / json.loads(r)[
        "path"])}) + "\n" for r in rows[:2]))
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps({**json.loads(r), "path": str(corpus / json.loads(r)[
        "path"])}) + "\n" for r in rows))
    out = tmp_path / "shards"
    precompute(first, out, codec=str(ckpt), **OPTS)
    _other_codec().save_audiocraft(ckpt)  # the same spec now names other weights
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(NoencoreError, match=rf"{out / 'header.json'}: these shards were begun "
                       rf"with other weights of codec '{ckpt}'"):
        precompute(both, out, codec=str(ckpt), **OPTS)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
