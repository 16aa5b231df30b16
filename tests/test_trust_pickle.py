"""Files from elsewhere run no code: CLAP checkpoints, codec checkpoints and model folders
go through one reader (``noencore.fileio.load_torch``) that refuses a pickle needing more
than tensors and plain data, naming the file and the opt-in; what the published formats
hold (numpy scalars and arrays beside the tensors) loads without it."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

from noencore.errors import NoencoreError, UntrustedFileError


class Payload:
    """A pickle that runs code when read: it creates ``marker``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _refused(call, path: pathlib.Path, marker: pathlib.Path) -> None:
    with pytest.raises(UntrustedFileError) as err:
        call()
    text = str(err.value)
    assert str(path) in text and "--trust-pickle" in text and "trust_pickle=True" in text, text
    assert not marker.exists()  # nothing ran


def test_the_reader_refuses_code_and_reads_plain_data(tmp_path):
    from noencore.fileio import load_torch

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "extra": Payload(marker)}, crafted)
    _refused(lambda: load_torch(crafted, what="checkpoint"), crafted, marker)
    load_torch(crafted, what="checkpoint", trust_pickle=True)  # the opt-in: the full reader
    assert marker.exists()

    plain = tmp_path / "plain.pt"
    want = {"epoch": np.int64(15), "lr": np.float32(1e-4), "codes": np.arange(7, dtype=np.int16),
            "dtype": np.dtype("float64"), "w": torch.randn(2, 3), "names": ["a", "b"]}
    torch.save(want, plain)
    got = load_torch(plain, what="checkpoint")
    assert got["epoch"] == 15 and got["codes"].dtype == np.int16 and got["names"] == ["a", "b"]
    assert torch.equal(got["w"], want["w"]) and got["dtype"] == np.dtype("float64")

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NoencoreError, match=f"cannot read checkpoint {junk}: not a torch.save"):
        load_torch(junk, what="checkpoint")
    with pytest.raises(NoencoreError, match="cannot read checkpoint .*gone.pt"):
        load_torch(tmp_path / "gone.pt", what="checkpoint")


def test_clap_checkpoint_with_laion_structure_loads_and_a_crafted_one_is_refused(tmp_path):
    from noencore.evaluation.clap import build_random_clap, load_clap

    ckpt, tok = build_random_clap(tmp_path / "clap")
    sd = torch.load(ckpt, weights_only=True)
    # laion-clap's published layout: epoch, the DDP-prefixed state dict, optimizer state
    # whose counters are numpy scalars
    laion = tmp_path / "laion.pt"
    torch.save({"epoch": np.int64(15), "name": "music_audioset",
                "state_dict": {k if k.startswith("module.") else f"module.{k}": v
                               for k, v in sd["state_dict"].items()},
                "optimizer": {"state": {0: {"step": np.float32(3.0)}},
                              "param_groups": [{"lr": np.float64(1e-4), "params": [0]}]}},
               laion)
    clap = load_clap(laion, tok, amodel="HTSAT-tiny")
    ref = load_clap(ckpt, tok, amodel="HTSAT-tiny")
    np.testing.assert_allclose(clap.text_embeddings(["a song", "a piano piece"]),
                               ref.text_embeddings(["a song", "a piano piece"]), rtol=1e-6)

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({**sd, "epoch": Payload(marker)}, crafted)
    _refused(lambda: load_clap(crafted, tok, amodel="HTSAT-tiny"), crafted, marker)


def test_codec_files_and_model_folders_run_no_code(tmp_path, capsys):
    from omegaconf import OmegaConf

    from noencore.data.codec import load_codec
    from noencore.models import load_musicgen, save_musicgen

    marker = tmp_path / "ran"
    folder = save_musicgen(load_musicgen("tiny"), tmp_path / "model")
    state = folder / "compression_state_dict.bin"
    pkg = torch.load(state, weights_only=True)
    torch.save({**pkg, "note": Payload(marker)}, state)
    _refused(lambda: load_codec(str(folder)), state, marker)
    _refused(lambda: load_codec(str(state)), state, marker)
    _refused(lambda: load_musicgen(str(folder)), state, marker)  # a model folder's codec
    load_musicgen(str(folder), with_codec=False)  # the LM alone reads safe files only
    # the CLI: one line naming the file, no traceback; --trust-pickle (before or after the
    # command) is the opt-in
    from noencore.cli import main

    assert main(["convert", str(folder), str(tmp_path / "hf")]) == 1
    said = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]
    assert len(said) == 1 and said[0].startswith("noencore convert: error: "), said
    assert str(state) in said[0] and "--trust-pickle" in said[0]
    assert not marker.exists() and not (tmp_path / "hf").exists()
    with pytest.raises(NoencoreError):  # trusted and read: the codec is not a transformers one
        main(["--debug", "convert", str(folder), str(tmp_path / "hf"), "--trust-pickle"])
    assert marker.exists()
    marker.unlink()
    load_musicgen(str(folder), trust_pickle=True)
    assert marker.exists()

    # an older audiocraft export (omegaconf objects pickled): refused without the opt-in,
    # read with it
    codec = load_codec("tiny")
    export = codec.save_audiocraft(tmp_path / "codec")
    old = torch.load(export, weights_only=True)
    old["xp.cfg"] = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(old["xp.cfg"])))
    torch.save(old, export)
    with pytest.raises(UntrustedFileError, match=str(export)):
        load_codec(str(export))
    again = load_codec(str(export), trust_pickle=True)
    wav = torch.randn(1, 1, 3200) * 0.2
    assert torch.equal(again.encode(wav), codec.encode(wav))
