"""The repository imports only as ``noencore``: no file of it shadows another package.

transformers imports Hugging Face's ``kernels`` package; a repository folder importable
as a top-level ``kernels`` (from the repository root, an editable install or a wheel)
broke audiocraft and peft at import. The Triton sources stay in the top-level
``kernels/`` folder (the layout's) but import only as ``noencore.kernels``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _python(code: str, cwd: Path = ROOT) -> str:
    """Run ``code`` as ``python -c`` with ``cwd`` first on sys.path (as ``python -m`` from
    the repository root puts it); return stdout, failing with stderr."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _inside_repo(path: str | None) -> bool:
    """A file of the repository's own tree (the environment may live inside it: .venv)."""
    if path is None:
        return False
    p = Path(path).resolve()
    return p.is_relative_to(ROOT) and not p.is_relative_to(Path(sys.prefix).resolve())


def test_kernels_never_resolves_inside_the_repository():
    out = _python("import importlib.util, json\n"
                  "s = importlib.util.find_spec('kernels')\n"
                  "print(json.dumps(None if s is None else [s.origin, "
                  "list(s.submodule_search_locations or [])]))")
    import json

    spec = json.loads(out)
    if spec is not None:
        origin, locations = spec
        assert not _inside_repo(origin), f"'kernels' resolves to {origin}"
        assert not any(_inside_repo(p) for p in locations), locations
    # nothing at the repository root is a regular package but noencore
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    assert packages == ["noencore"], packages


def test_transformers_kernels_peft_and_noencore_import_together():
    out = _python("import kernels, transformers.integrations.hub_kernels, peft, noencore\n"
                  "import noencore.kernels.ce_ascent as k\n"
                  "print(kernels.__file__); print(k.__file__)")
    hf_kernels, ours = out.split()
    assert not _inside_repo(hf_kernels), hf_kernels  # Hugging Face's package, installed
    assert Path(ours).resolve() == (ROOT / "kernels" / "ce_ascent.py").resolve()


@pytest.mark.slow
def test_a_built_wheel_holds_no_top_level_package_but_noencore(tmp_path):
    """Build a wheel from a copy of the tree (nothing written into the repository)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("noencore", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          env={**ENV, "NOENCORE_NO_CPP": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("noencore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"noencore"}, sorted(top)
    assert "noencore/kernels/ce_ascent.py" in names  # the Triton sources ship inside
    # the installed layout imports the kernels as noencore.kernels, from any folder
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    out = _python("import noencore.kernels.ce_ascent as k; print(k.__file__)", cwd=target)
    assert Path(out.strip()).resolve().is_relative_to(target.resolve())
