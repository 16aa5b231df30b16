"""MusicGen loading/saving, the hidden-state adapter and the text-condition cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from noencore.errors import NoencoreError

CAPTIONS = ["a calm piano piece", "loud rock guitar and drums, very energetic", "", "jazz"]


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    from noencore.models import build_condition_cache, load_musicgen

    model = load_musicgen("tiny")
    cache = build_condition_cache(tmp_path_factory.mktemp("cond"), CAPTIONS, model.text_encoder,
                                  progress=False)
    return model, cache


class _Batch:
    def __init__(self, codes, mask):
        self.codes, self.mask = codes, mask


def _reference_logits(model, codes, captions):
    from audiocraft.modules.conditioners import ConditioningAttributes

    conds = [ConditioningAttributes(text={model.text_attribute: c}) for c in captions]
    with torch.no_grad():
        return model.lm.compute_predictions(codes, conds)


@pytest.mark.parametrize("T", [1, 7, 19])
def test_codebook_rows_match_compute_predictions(tiny_env, T):
    model, cache = tiny_env
    model.lm.eval()
    B = len(CAPTIONS)
    codes = torch.randint(0, model.card, (B, model.n_q, T))
    mask = torch.rand(B, model.n_q, T) > 0.2
    ref = _reference_logits(model, codes, CAPTIONS)
    with torch.no_grad():
        rows = model.codebook_rows(_Batch(codes, mask), cache.batch(CAPTIONS))
    assert len(rows) == model.n_q
    for k, r in enumerate(rows):
        want = ref.mask[:, k] & mask[:, k]
        assert r.hidden.shape == (int(want.sum()), model.lm.dim)
        assert torch.equal(torch.stack([r.item, r.time]), torch.stack(want.nonzero(as_tuple=True)))
        assert torch.equal(r.targets, codes[r.item, k, r.time])
        logits = r.hidden @ r.weight.T
        torch.testing.assert_close(logits, ref.logits[r.item, k, r.time], rtol=1e-5, atol=1e-5)
        assert not torch.isnan(logits).any()


def test_adapter_folds_head_bias(tmp_path):
    from noencore.models import load_musicgen

    model = load_musicgen("tiny", with_codec=False,
                          overrides={"transformer_lm": {"bias_proj": True, "num_layers": 1}})
    for lin in model.lm.linears:
        torch.nn.init.normal_(lin.bias)
    from noencore.models import build_condition_cache

    cache = build_condition_cache(tmp_path / "c", CAPTIONS[:2], model.text_encoder,
                                  progress=False)
    codes = torch.randint(0, model.card, (2, 4, 6))
    ref = _reference_logits(model, codes, CAPTIONS[:2])
    with torch.no_grad():
        rows = model.codebook_rows(_Batch(codes, torch.ones_like(codes, dtype=torch.bool)),
                                   cache.batch(CAPTIONS[:2]))
    assert rows[0].weight.shape == (model.card, model.lm.dim + 1)
    for k, r in enumerate(rows):
        torch.testing.assert_close(r.hidden @ r.weight.T, ref.logits[r.item, k, r.time],
                                   rtol=1e-5, atol=1e-5)


def test_condition_cache_checks(tiny_env, tmp_path):
    from noencore.models import ConditionCache, build_condition_cache
    from noencore.models.text import TextEncoder

    model, cache = tiny_env
    enc = TextEncoder(model.text_encoder)
    for cap, (e, m) in zip(CAPTIONS, enc.encode(CAPTIONS)):
        ce, cm = cache.get(cap)
        torch.testing.assert_close(ce, e)
        assert torch.equal(cm, m)
    assert not cache.get("")[1].any()  # an empty caption is fully masked, as in audiocraft
    emb, mask = cache.batch(CAPTIONS)
    assert emb.shape[:2] == mask.shape and emb.shape[2] == cache.dim
    # a corrupted entry is refused, naming the file
    folder = build_condition_cache(tmp_path / "c", ["x y"], model.text_encoder, progress=False)
    path = folder.path("x y")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(NoencoreError, match="checksum"):
        ConditionCache(folder.folder).get("x y")
    data[:8] = (10 ** 9).to_bytes(8, "little")  # a header length past the file's end
    path.write_bytes(bytes(data))
    for read in (lambda c: c.get("x y"), lambda c: c.length):
        with pytest.raises(NoencoreError, match=f"{path}: damaged condition-cache entry"):
            read(ConditionCache(folder.folder))
    with pytest.raises(NoencoreError, match="no cached condition"):
        cache.get("never seen")
    with pytest.raises(NoencoreError, match="index.json missing"):
        ConditionCache(tmp_path / "nothing")


def test_save_then_audiocraft_loads_and_generates(tiny_env, tmp_path):
    from noencore.models import load_musicgen, save_musicgen

    model, _ = tiny_env
    with torch.no_grad():
        model.lm.linears[0].weight.add_(0.5)  # make it differ from a fresh "tiny"
    folder = save_musicgen(model, tmp_path / "m")
    assert {p.name for p in folder.iterdir()} >= {"state_dict.bin", "compression_state_dict.bin",
                                                  "model.safetensors"}
    again = load_musicgen(str(folder))
    for (k, a), (k2, b) in zip(model.lm.state_dict().items(), again.lm.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    from safetensors.torch import load_file

    st = load_file(folder / "model.safetensors")
    assert torch.equal(st["linears.0.weight"], model.lm.linears[0].weight)
    # a fresh process, as a user's own tool: register the local T5, then audiocraft loads it
    code = (
        "import torch, sys\n"
        "from noencore.models.text import register_t5\n"
        f"register_t5({model.text_encoder!r}, 32)\n"
        "from audiocraft.models import MusicGen\n"
        f"mg = MusicGen.get_pretrained({str(folder)!r}, device='cpu')\n"
        "sd = mg.lm.state_dict()\n"
        "from safetensors.torch import load_file\n"
        f"st = load_file({str(folder / 'model.safetensors')!r})\n"
        "assert all(torch.equal(sd[k], v) for k, v in st.items())\n"
        "mg.set_generation_params(duration=0.1)\n"
        "wav = mg.generate(['a calm piano piece'])\n"
        "assert wav.shape[:2] == (1, 1) and wav.shape[-1] > 0 and torch.isfinite(wav).all()\n"
        "print('OK', tuple(wav.shape))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=240)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_load_errors(tmp_path):
    from noencore.models import load_musicgen

    with pytest.raises(NoencoreError, match="not a folder, a file, a hub id"):
        load_musicgen("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoencoreError, match="no state_dict.bin"):
        load_musicgen(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "state_dict.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(NoencoreError, match=r"cannot read audiocraft LM checkpoint .*bad"
                       r"/state_dict.bin: not a torch.save file"):
        load_musicgen(str(bad))


def test_musicgen_small_random_has_the_real_shapes(tmp_path, monkeypatch):
    # One layer is built (the full LM takes ~40 s to initialise): the count of a layer and
    # of everything around the layers is the planner's, which test_plan checks against
    # audiocraft's LMModel at every size; the layer count is read from the config.
    import dataclasses

    from noencore.models import load_musicgen
    from noencore.models.musicgen import NAMED_CONFIGS, text_encoder_name
    from noencore.planner import T5_BASE_DIM, get_arch

    monkeypatch.setenv("NOENCORE_CACHE", str(tmp_path))
    spec, small = "musicgen-small-random", get_arch("small")
    assert NAMED_CONFIGS[spec]["num_layers"] == small.num_layers == 24
    model = load_musicgen(spec, overrides={"transformer_lm": {"num_layers": 1}})
    one_layer = dataclasses.replace(small, num_layers=1)
    assert sum(p.numel() for p in model.lm.parameters()) == one_layer.n_params()
    assert small.n_params() == 420_371_456
    attn = model.lm.transformer.layers[0].self_attn
    assert attn.memory_efficient and attn.num_heads == small.num_heads  # as released
    assert (model.n_q, model.card) == (small.n_q, small.card)
    t5 = model.lm.condition_provider.conditioners[model.text_attribute].t5
    assert t5.config.d_model == T5_BASE_DIM and model.text_encoder == text_encoder_name(spec)
    assert model.codec.spec == "musicgen-32khz"  # the full-size codec architecture
    assert sum(p.numel() for p in model.codec.model.parameters()) > 50_000_000


def test_random_t5_sizes(tmp_path):
    from noencore.models.text import RANDOM_T5, random_t5_folder, tiny_t5_folder

    # T5-base's width: the conditions the LM cross-attends to are 768-d, 12 heads of 64
    base = RANDOM_T5["base-width"]
    assert (base["d_model"], base["num_heads"] * base["d_kv"], base["d_ff"]) == (768, 768, 3072)
    assert tiny_t5_folder(tmp_path) == random_t5_folder("tiny", tmp_path)
    with pytest.raises(ValueError, match="no random T5 'base'.*base-width"):
        random_t5_folder("base", tmp_path)
