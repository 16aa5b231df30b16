"""CLAP offline: laion_clap imports without the hub, a random-weight CLAP loads from disk."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from noencore.errors import NoencoreError


@pytest.fixture(scope="module")
def random_clap(tmp_path_factory):
    from noencore.evaluation.clap import build_random_clap, load_clap

    ckpt, tok = build_random_clap(tmp_path_factory.mktemp("clap"))
    return ckpt, tok, load_clap(ckpt, tok, amodel="HTSAT-tiny")


def test_laion_clap_imports_offline_with_lazy_tokenizers():
    import transformers

    from noencore.evaluation.clap_compat import LazyPretrained, import_laion_clap

    mod = import_laion_clap()
    assert mod.CLAP_Module is not None
    data = sys.modules["laion_clap.training.data"]
    for name in ("bert_tokenizer", "roberta_tokenizer", "bart_tokenizer"):
        assert isinstance(getattr(data, name), LazyPretrained)
    # the patch is scoped to the import: transformers' own loader is back
    assert not isinstance(transformers.RobertaTokenizer.from_pretrained.__func__, LazyPretrained)
    assert transformers.RobertaTokenizer.from_pretrained.__func__.__name__ == "from_pretrained"
    # the torchvision stand-in (if one was needed) is gone again for later importers
    assert not getattr(sys.modules.get("torchvision"), "__noencore_standin__", False)


def test_lazy_tokenizer_defers_and_explains():
    from noencore.evaluation.clap_compat import LazyPretrained

    calls = []

    def loader(name):
        calls.append(name)
        return str.upper

    lazy = LazyPretrained(loader, ("some-tokenizer",), {})
    assert calls == []  # nothing loaded at construction (import time)
    assert lazy("abc") == "ABC" and lazy("d") == "D" and calls == ["some-tokenizer"]

    def failing(name):
        raise OSError("offline")

    with pytest.raises(RuntimeError, match="some-tokenizer.*offline.*local"):
        LazyPretrained(failing, ("some-tokenizer",), {})("x")


def test_random_clap_embeddings(random_clap):
    _, _, clap = random_clap
    assert clap.random_weights
    caps = ["a calm piano piece", "loud drums and bass", "x"]
    t = clap.text_embeddings(caps, batch_size=2)
    assert t.shape == (3, 512) and t.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    # batching does not change results
    np.testing.assert_allclose(clap.text_embeddings(caps, batch_size=3), t, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    short = torch.randn(32000 * 2, generator=g) * 0.2
    long = torch.randn(48000 * 12, generator=g) * 0.1  # 12 s at 48 kHz
    both = clap.audio_embeddings([short, long], 48000, batch_size=2)
    assert both.shape == (2, 512) and both.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    # one clip per call gives the same rows (no batch effects), and a clip longer than
    # 10 s is cut to its first 10 s (no random crop: the metric is repeatable)
    np.testing.assert_allclose(clap.audio_embeddings(short[None, None], 48000), both[:1],
                               atol=1e-5)
    np.testing.assert_allclose(clap.audio_embeddings([long[:480000]], 48000), both[1:],
                               atol=1e-5)
    assert clap.audio_embeddings([], 48000).shape == (0, 512)


def test_clap_load_errors(random_clap, tmp_path):
    from noencore.evaluation.clap import _write_byte_tokenizer, load_clap

    ckpt, tok, _ = random_clap
    with pytest.raises(NoencoreError, match="not found"):
        load_clap(tmp_path / "nope.pt", tok)
    # a tokenizer whose vocabulary does not fit the checkpoint is refused
    other = _write_byte_tokenizer(tmp_path / "tok2")
    other.add_tokens(["extra1", "extra2"])
    other.save_pretrained(str(tmp_path / "tok2"))
    with pytest.raises(NoencoreError, match="expects"):
        load_clap(ckpt, tmp_path / "tok2", amodel="HTSAT-tiny")
    with pytest.raises(NoencoreError, match="does not fit"):
        load_clap(ckpt, tok, amodel="HTSAT-base")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NoencoreError, match="cannot be read"):
        load_clap(tmp_path / "junk.pt", tok)


@pytest.mark.slow
def test_generation_metrics_with_random_clap(random_clap, tmp_path):
    """Generation metrics run end to end (batched generate + decode + CLAP) and the report
    says the CLAP weights were random."""
    from noencore.data.shards import TokenShards
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.generation import GenerationConfig
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen
    from noencore.models.text import build_condition_cache

    ckpt, tok, _ = random_clap
    rng = np.random.default_rng(3)
    caps = ["calm piano", "fast drums"] * 2
    codes = [rng.integers(0, 2048, size=(4, 30)) for _ in caps]
    path = write_code_shards(tmp_path / "sh", codes, caps, ["forget"] * 2 + ["remain"] * 2)
    model = load_musicgen("tiny")
    build_condition_cache(path / "conditions", caps, model.text_encoder, progress=False)
    sh = TokenShards(path)
    sets = {"forget": sh.select(split="forget"), "remain": sh.select(split="remain")}
    cfg = GenerationConfig(frames=20, batch_size=2, max_items=2, prompt_frames=10,
                           continuation_frames=8)
    r = evaluate(model, sets, reference=load_musicgen("tiny", seed=1), clap=ckpt,
                 clap_tokenizer=tok, clap_model="HTSAT-tiny", generation=cfg,
                 out=tmp_path / "out", progress=False)
    gen = r["generation"]
    assert gen["random_clap"] is True
    assert any("RANDOM" in n for n in r["notes"])
    for role in ("after", "before"):
        for s in ("forget", "remain"):
            assert -1.0 <= gen[role]["clap_score"][s] <= 1.0
            assert gen[role]["fad"][s] >= 0.0
            mem = gen[role]["memorization"][s]
            assert mem["clip"] <= mem["nearest"] + 1e-9  # the own clip is one of the pool
            assert 0.0 <= r["continuation"][role][s] <= 1.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "CLAP weights are RANDOM" in md and "CLAP text-audio score" in md
