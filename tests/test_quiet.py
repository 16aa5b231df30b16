"""Commands keep the terminal free of third-party warnings that ask the user to act when
nothing is wrong (xFormers' missing-extension message, torch's weight_norm deprecation)."""
from __future__ import annotations

import os
import subprocess
import sys

import soundfile as sf
import torch
from test_data_corpus import music

CPU_ONLY = torch.version.cuda is None and torch.version.hip is None


def run(args: list[str], cwd) -> str:
    """stderr of ``python ARGS`` (offline, default warning filters, as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_precompute_prints_nothing_on_stderr(tmp_path):
    """The codec build imports audiocraft (and with it xFormers) and builds SEANet."""
    sf.write(tmp_path / "a.wav", music(32000, 1, 1.0, 0), 32000)
    (tmp_path / "m.jsonl").write_text('{"id": "a", "path": "a.wav", "caption": "a"}\n')
    err = run(["-m", "noencore", "precompute", "m.jsonl", "out", "--codec", "tiny",
               "--workers", "0", "--quiet"], tmp_path)
    if CPU_ONLY:
        assert err == ""
    else:  # a CUDA torch shows a mismatched xFormers build on purpose
        assert "FutureWarning" not in err


def test_model_load_has_no_warning(tmp_path):
    """Building the LM imports audiocraft first through the T5 conditioner registration."""
    err = run(["-c", "from noencore.models.musicgen import load_musicgen; "
                     "load_musicgen('tiny', with_codec=False)"], tmp_path)
    assert "Warning" not in err and "WARNING" not in err
    if CPU_ONLY:
        assert "xFormers" not in err and "reinstall" not in err
