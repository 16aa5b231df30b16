"""Output folders: one writer at a time, and nothing of anyone else's touched.

``claim(folder, kind, resume=..., overwrite=...)`` is held for the whole job (a context
manager). It

* locks the folder: ``.noencore.lock`` is created exclusively and names the process
  (pid, host, kind, start). A second job into the folder is refused at once, naming the
  first. A lock left by a crashed job on this host (its pid is gone) is taken over; one
  from another host is named, with the file to remove once that job is known to be gone.
* keeps a list of what the tool wrote (``.noencore-run.json``: the job's kind and the
  files it wrote, relative to the folder; a job declares up front the names it will
  write, ``own``, so that one killed midway leaves a folder its resume recognises). A folder that holds an earlier job of the same
  kind is refused unless the job resumes it (``resume``) or replaces it (``overwrite``:
  exactly the listed files are removed, and the folders they leave empty); a folder that
  holds anything else is refused whatever the flags: the tool deletes only what it wrote.

Under a launcher only rank 0 claims the folder (the others write into it after a barrier).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path
from typing import Any

from noencore.errors import NoencoreError
from noencore.fileio import atomic_write

LOCK = ".noencore.lock"
LISTING = ".noencore-run.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """A claimed output folder (see the module docstring)."""

    def __init__(self, folder: Path, kind: str, *, resume: bool, overwrite: bool,
                 whole: bool = False, lock_only: bool = False):
        self.folder, self.kind = Path(folder), kind
        self.resume, self.overwrite, self.whole = resume, overwrite, whole
        self.lock_only = lock_only
        self.files: list[str] = []
        self._locked = False

    # -- the lock ------------------------------------------------------------------------
    def _lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "kind": self.kind,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds")}
        path = self.folder / LOCK
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder(path)
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    path.unlink(missing_ok=True)  # a crashed job's lock on this host
                    continue
                raise NoencoreError(
                    f"{self.folder}: another noencore {holder.get('kind', 'job')} is writing "
                    f"here (pid {holder.get('pid')} on {holder.get('host')}, since "
                    f"{holder.get('started')}); wait for it to finish, or remove {path} once "
                    "that job is known to be gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise NoencoreError(f"{path}: could not take the folder's lock; try again")

    @staticmethod
    def _holder(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    # -- what the folder holds -------------------------------------------------------------
    def _listing(self) -> dict[str, Any] | None:
        path = self.folder / LISTING
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NoencoreError(f"{path}: unreadable list of this tool's files ({exc}); "
                                "give a new or empty folder") from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise NoencoreError(f"{path}: not a list of this tool's files; give a new or "
                                "empty folder")
        return data

    def _check_contents(self) -> None:
        listing = self._listing()
        listed = set(listing["files"]) if listing else set()
        entries = [p for p in self.folder.iterdir() if p.name not in (LOCK, LISTING)]
        if listing is not None and entries and listing.get("kind") != self.kind:
            raise NoencoreError(f"{self.folder}: holds a noencore {listing.get('kind')} job's "
                                f"files, not a {self.kind}'s; give another folder")
        whole = bool(listing and listing.get("whole"))
        foreign = [] if whole else [p for p in entries if not any(
            f == p.name or f.startswith(p.name + "/") for f in listed)]
        if foreign:
            names = ", ".join(sorted(p.name for p in foreign)[:3])
            raise NoencoreError(f"{self.folder}: holds files this tool did not write ({names}"
                                f"{' ...' if len(foreign) > 3 else ''}); give a new or empty "
                                "folder (nothing in it is removed)")
        if listing is None or not entries:
            return
        if self.resume:
            self.files = list(listing["files"])
            return
        if not self.overwrite:
            raise NoencoreError(f"{self.folder}: holds an earlier {self.kind} run; continue it "
                                "with --resume, replace it with --overwrite, or give another "
                                "folder")
        self._remove(listing["files"])

    def _remove(self, files: list[str]) -> None:
        """Remove exactly ``files`` (relative paths this tool listed), then the folders
        they leave empty, deepest first; never anything else."""
        root = self.folder.resolve()
        dirs = set()
        for rel in files:
            path = (self.folder / rel).resolve()
            if root not in path.parents:
                raise NoencoreError(f"{self.folder / LISTING}: lists {rel!r}, outside the "
                                    "folder; remove the folder's files by hand")
            if path.is_dir() and not path.is_symlink():  # a folder the job declared its own
                for q in sorted(path.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                    q.rmdir() if q.is_dir() and not q.is_symlink() else q.unlink()
                dirs.add(path)
            elif path.is_file() or path.is_symlink():
                path.unlink()
            dirs.update(p for p in path.parents if root in p.parents)
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.files = []
        self._save()

    def _save(self) -> None:
        atomic_write(self.folder / LISTING, json.dumps(
            {"kind": self.kind, "whole": self.whole, "files": sorted(set(self.files))},
            indent=1).encode())

    def own(self, names: list[str]) -> None:
        """Declare, before writing them, the files and folders (relative names) this job
        will write: a job killed midway leaves a folder the next claim recognises."""
        self.files += [str(n) for n in names]
        self._save()

    def wrote(self, *paths: str | os.PathLike) -> None:
        """Record files (or every file under folders) this job wrote into the folder."""
        root = self.folder.resolve()
        for p in paths:
            path = Path(p).resolve()
            found = [q for q in path.rglob("*") if q.is_file()] if path.is_dir() else [path]
            for q in found:
                if root in q.parents:
                    self.files.append(q.relative_to(root).as_posix())
        self._save()

    # -- the claim -------------------------------------------------------------------------
    def __enter__(self) -> RunFolder:
        if self.folder.exists() and not self.folder.is_dir():
            raise NoencoreError(f"{self.folder}: exists and is not a folder; give a folder path")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        if self.lock_only:
            return self
        try:
            self._check_contents()
            self._save()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self._locked:
            (self.folder / LOCK).unlink(missing_ok=True)
            self._locked = False


def claim(folder: str | os.PathLike, kind: str, *, resume: bool = False,
          overwrite: bool = False, whole: bool = False) -> RunFolder:
    """Claim ``folder`` for a job of ``kind`` (see the module docstring). ``whole``: the
    folder, new or empty at its first claim, is the job's entirely (a job that keeps and
    replaces its own stages in it, as the demo does); later claims by the same kind take
    everything in it as the job's."""
    return RunFolder(Path(folder), kind, resume=resume, overwrite=overwrite, whole=whole)


def lock(folder: str | os.PathLike, kind: str) -> RunFolder:
    """Only the lock of ``claim`` (one writer at a time, a crashed job's lock taken over),
    for a job that adds to a folder and never removes anything, as the condition cache
    does; a context manager."""
    return RunFolder(Path(folder), kind, resume=True, overwrite=False, lock_only=True)


def _local(thing: Any) -> Path | None:
    """The local folder or file an input names (a path, a hub id that is not one: None;
    token shards, a condition cache or a model: where they were read from)."""
    for attr in ("path", "folder", "spec"):
        if not isinstance(thing, str | os.PathLike) and hasattr(thing, attr):
            thing = getattr(thing, attr)
            break
    if not isinstance(thing, str | os.PathLike):
        return None
    path = Path(thing).expanduser()
    return path.resolve() if path.exists() else None


def check_apart(out: str | os.PathLike, inputs: dict[str, Any]) -> None:
    """Refuse an output folder that is one of the job's inputs, lies inside one, or holds
    one (``inputs``: role -> a path, a loaded input, or a hub id, which is skipped): a
    run's own files would replace or bury what it reads."""
    here = Path(out).expanduser().resolve()
    for role, thing in inputs.items():
        path = _local(thing)
        if path is None:
            continue
        how = ("is" if here == path else "lies inside" if path in here.parents
               else "holds" if here in path.parents else None)
        if how:
            raise NoencoreError(f"{out}: the output folder {how} the {role} ({path}); give "
                                "an output folder apart from every input")
