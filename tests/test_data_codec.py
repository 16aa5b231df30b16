"""load_codec / Codec: built-in specs, the audiocraft checkpoint format, clear errors."""
from __future__ import annotations

import pytest
import torch
from test_data_corpus import one_torch_thread  # noqa: F401 (autouse fixture)

from noencore.data.codec import load_codec
from noencore.errors import NoencoreError


@pytest.fixture(scope="module")
def tiny():
    return load_codec("tiny")


def test_tiny_codec_facts_and_shapes(tiny):
    assert (tiny.sample_rate, tiny.frame_rate, tiny.n_q, tiny.card, tiny.hop) == (
        32000, 50, 4, 2048, 640)
    for samples in (640, 641, 32000 + 123):
        wav = torch.randn(3, 1, samples) * 0.1
        codes = tiny.encode(wav)
        assert codes.dtype == torch.long and codes.shape == (3, 4, tiny.frames_for(samples))
        assert 0 <= int(codes.min()) and int(codes.max()) < 2048
    wav = torch.randn(2, 1, 3200) * 0.1
    assert tiny.decode(tiny.encode(wav)).shape == (2, 1, 3200)


def test_tiny_codec_is_seeded_and_codes_are_diverse(tiny):
    torch.manual_seed(5)
    wav = torch.randn(2, 1, 16000) * 0.2
    again = load_codec("tiny")
    assert torch.equal(tiny.encode(wav), again.encode(wav))
    assert tiny.encode(wav)[:, 0].unique().numel() > 20  # not collapsed onto one code
    # Loading does not consume the caller's random state.
    torch.manual_seed(7)
    a = torch.rand(1)
    torch.manual_seed(7)
    load_codec("tiny")
    assert torch.equal(torch.rand(1), a)


def test_batch_rows_are_encoded_independently(tiny):
    """Precompute's resume relies on it: a segment's codes must not depend on its batch."""
    wav = torch.randn(5, 1, 6400) * 0.2
    together = tiny.encode(wav)
    alone = torch.cat([tiny.encode(wav[i:i + 1]) for i in range(5)])
    assert torch.equal(together, alone)


def test_save_audiocraft_round_trip_and_audiocraft_loads_it(tiny, tmp_path):
    from audiocraft.models.loaders import load_compression_model

    file = tiny.save_audiocraft(tmp_path / "ckpt")
    assert file.name == "compression_state_dict.bin"
    wav = torch.randn(2, 1, 8000) * 0.2
    want = tiny.encode(wav)
    for spec in (str(tmp_path / "ckpt"), str(file)):
        back = load_codec(spec)
        assert back.spec == spec and torch.equal(back.encode(wav), want)
    # audiocraft's own loader reads the same file (what MusicGen.get_pretrained does).
    ac = load_compression_model(str(file))
    assert torch.equal(ac.encode(wav)[0], want)


def test_bf16_path_runs_and_mostly_agrees(tiny):
    wav = torch.randn(2, 1, 16000) * 0.2
    full, half = tiny.encode(wav), tiny.encode(wav, torch.bfloat16)
    assert half.shape == full.shape and half.dtype == torch.long
    assert (half[:, 0] == full[:, 0]).float().mean() > 0.5


def test_bad_specs_are_clear(tmp_path):
    with pytest.raises(NoencoreError, match="no such file or folder"):
        load_codec(str(tmp_path / "nope" / "x.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoencoreError, match="neither compression_state_dict.bin"):
        load_codec(str(tmp_path / "empty"))
    (tmp_path / "bad.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(NoencoreError, match="cannot read codec checkpoint"):
        load_codec(str(tmp_path / "bad.bin"))
    # Offline (tests set HF_HUB_OFFLINE=1): a hub id fails fast with what to do.
    with pytest.raises(NoencoreError, match="download the checkpoint"):
        load_codec("facebook/musicgen-small")
