"""Atomic training checkpoints: a crash never leaves one that looks complete but isn't.

Layout: ``OUT/checkpoints/step_000040/`` holding ``state.pt`` (or DeepSpeed's files) and
``manifest.json`` (step, sha256 of every file). A checkpoint is written in a temporary
sibling folder and renamed in one step; ``latest_checkpoint`` only trusts folders whose
manifest lists files that exist with the recorded checksums.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from noencore.errors import NoencoreError
from noencore.fileio import sha256_file

MANIFEST = "manifest.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder to write step ``step``'s checkpoint into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step_{step:07d}-"))


def commit(tmp: Path, step: int, extra: dict | None = None, keep: int = 2) -> Path:
    """Checksum ``tmp``'s files, write the manifest, rename to its final name.

    Older checkpoints beyond the ``keep`` most recent are removed after the rename.
    """
    tmp = Path(tmp)
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"step": int(step), "files": files, **(extra or {})}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    final = checkpoint_dir(tmp.parent, step)
    if final.exists():  # same step written again (resume at the end): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(tmp.parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).exists())


def verify(folder: Path) -> dict:
    """The manifest of ``folder`` after checking every file's checksum."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise NoencoreError(f"{folder}: unreadable checkpoint manifest ({exc})") from exc
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise NoencoreError(f"{path}: missing or corrupt (checksum mismatch); delete "
                                f"{folder} to resume from an older checkpoint")
    return manifest


def latest_verified(root: Path, skipped: list[str] | None = None
                    ) -> tuple[Path, dict] | None:
    """(folder, manifest) of the newest checkpoint under ``root`` that verifies (each file
    hashed once), or None; each newer one that did not verify is added to ``skipped`` as
    the reason it was passed over."""
    for folder in reversed(list_checkpoints(root)):
        try:
            return folder, verify(folder)
        except NoencoreError as exc:
            if skipped is not None:
                skipped.append(str(exc))
            continue
    return None


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint under ``root`` that verifies, or None."""
    found = latest_verified(root)
    return found[0] if found is not None else None
