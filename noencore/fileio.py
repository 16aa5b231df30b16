"""Durable file writes and checksums, shared by every stage, and the one reader of
``torch.save`` files from elsewhere (``load_torch``: no code runs from them).

Nothing half-written is ever read back as valid: writes go to a temporary name in the
same folder, are fsync'ed, then renamed over the target (atomic on POSIX), and the
folder is fsync'ed so that the rename survives a crash.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError, UntrustedFileError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name + fsync + rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_TRUST_PICKLE: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_pickle",
                                                                     default=False)


@contextlib.contextmanager
def trusting(trust: bool = True) -> Iterator[None]:
    """Within the block every ``load_torch`` call trusts its files (the CLI's
    ``--trust-pickle``: the user's word for the files of one command). A block inside
    another never withdraws the outer one's trust."""
    token = _TRUST_PICKLE.set(bool(trust) or _TRUST_PICKLE.get())
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def _numpy_globals() -> list:
    """The plain numpy types checkpoints hold beside their tensors (scalars, arrays,
    dtypes), under the names numpy 1 and numpy 2 pickle them by: data, never code."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    plain = [(core.multiarray.scalar, "scalar"), (core.multiarray._reconstruct, "_reconstruct"),
             (np.ndarray, None), (np.dtype, None)]
    out: list = []
    for obj, name in plain:
        if name is None:
            out.append(obj)
            continue
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            out.append((obj, f"{module}.{name}"))
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return out


def load_torch(path: str | os.PathLike, *, what: str, trust_pickle: bool = False,
               mmap: bool = False) -> Any:
    """Read a ``torch.save`` file that came from elsewhere without running code from it.

    The restricted unpickler (``weights_only=True``) with numpy's plain types allowed:
    tensors, containers, numbers, strings, numpy scalars and arrays. A file that needs
    anything else could run code when read, and is refused (``UntrustedFileError``,
    naming the file) unless ``trust_pickle``: the caller's explicit word that the file is
    trusted (``--trust-pickle``, ``trusting``). ``what`` names the file's role in messages.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as exc:
        raise NoencoreError(f"cannot read {what} {path}: {exc.strerror or exc}; check the "
                            "path") from exc
    if head != b"PK" and head[:1] != b"\x80":  # neither a torch zip nor a pickle stream
        raise NoencoreError(f"cannot read {what} {path}: not a torch.save file; re-download "
                            "or rebuild it")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise NoencoreError(f"cannot read {what} {path}: {str(exc).splitlines()[0]}; "
                                "re-download or rebuild it") from exc
        if not (trust_pickle or _TRUST_PICKLE.get()):
            found = [ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln]
            raise UntrustedFileError(
                f"{what} {path} holds more than tensors and plain data "
                f"({found[0].split(' was not')[0] if found else 'a pickled object'}): reading "
                "it would run code from the file. If you trust where it came from, pass "
                "--trust-pickle (trust_pickle=True); `noencore convert --trust-pickle` "
                "rewrites a model folder once into files that need no trust") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise NoencoreError(f"cannot read {what} {path}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                            "re-download or rebuild it") from exc
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
