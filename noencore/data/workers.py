"""Decoding worker processes: audio files decoded in parallel, results in manifest order.

Each worker is a fresh interpreter (``python -m noencore.data.workers``) that imports
only numpy, scipy, soundfile and ``noencore.data.audio``. It is not forked from the
caller, which has usually loaded torch: a forked child inherits an OpenMP runtime
whose threads it does not have (torch's multiprocessing notes advise spawn or
forkserver). Nor is it started by multiprocessing's spawn or forkserver, which import
the caller's main script again in every worker: a script that imports torch would load
it into each worker, and one without an ``if __name__ == "__main__"`` guard would run
again.

A worker decodes one file at a time and sends it as segments through a pipe (see
``decode_job``), so a worker holds a few segments, and the parent at most the file it
is collecting plus ``ahead`` segments read ahead. A worker that sends nothing for
``timeout`` seconds while the parent waits for its file (a named pipe, a stalled network
mount, a decoder stuck in a loop) is killed, the file fails with "decode timed out",
and a new worker takes over; so does one that dies (a crash in a decoder library).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from noencore.data.audio import decode_job

# (segments float32 [samples] each, sha256 of the source file), or the failure reason.
Result = tuple[list[np.ndarray], str] | str
# A fresh interpreter's imports take a second or two, more on a loaded machine; a worker
# that is not ready after this long fails the file it was given.
START_SECONDS = 60.0


class _Worker:
    """One worker process and the two pipes to it (jobs in, messages out)."""

    def __init__(self):
        jobs_r, jobs_w = os.pipe()
        msgs_r, msgs_w = os.pipe()
        # The worker must import this same noencore, wherever the caller found it.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "noencore.data.workers", str(jobs_r), str(msgs_w)],
                pass_fds=(jobs_r, msgs_w), stdin=subprocess.DEVNULL, env=env)
        except BaseException:
            for fd in (jobs_w, msgs_r):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(msgs_w)
        self.jobs = Connection(jobs_w, readable=False)
        self.msgs = Connection(msgs_r, writable=False)
        self.ready = False  # its imports are done: from then on its silence is timed

    def stop(self) -> None:
        """Kill the process (it holds nothing worth a clean exit) and close the pipes."""
        self.proc.kill()
        self.jobs.close()
        self.msgs.close()

    def exit_status(self) -> str:
        """How a process that closed its pipe ended, e.g. "signal SIGSEGV"."""
        code = self.proc.wait()
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


@dataclass
class _Job:
    args: tuple
    worker: _Worker | None  # None once finished (or inline)
    segments: list[np.ndarray] = field(default_factory=list)
    result: Result | None = None  # set once the file is decoded or has failed
    deadline: float | None = None  # set while the parent waits for this job

    def feed(self, kind: str, payload: Any) -> None:
        """Take one message of ``decode_job``."""
        if kind == "segment":
            self.segments.append(payload)
        elif kind == "done":
            self.result = (self.segments, payload)
        else:
            self.result = payload


class DecodePool:
    """Decodes ``decode_job`` argument tuples in ``workers`` processes; ``map`` yields the
    results in submission order. ``workers == 0`` decodes inline, in this process, and
    then nothing bounds a decode's time. ``ahead``: files in flight, and segments of
    files after the current one that the parent buffers. ``timeout``: seconds a worker
    may go without sending anything while the parent waits for its file.
    """

    def __init__(self, workers: int, timeout: float, ahead: int):
        self.workers, self.timeout, self.ahead = workers, timeout, ahead
        self.alive: list[_Worker] = []
        self.idle: list[_Worker] = []
        self.stopped: list[_Worker] = []

    def map(self, jobs: Iterable[tuple]) -> Iterator[Result]:
        if self.workers == 0:
            for args in jobs:
                job = _Job(args, None)
                for kind, payload in decode_job(*args):
                    job.feed(kind, payload)
                yield job.result
            return
        todo = iter(jobs)
        window: deque[_Job] = deque()
        while True:
            while len(window) < self.ahead and (self.idle or len(self.alive) < self.workers):
                args = next(todo, None)
                if args is None:
                    break
                window.append(self._start(args))
            if not window:
                return
            if window[0].result is None:
                self._receive(window)
            else:
                yield window.popleft().result

    def _start(self, args: tuple) -> _Job:
        if not self.idle:
            self.alive.append(_Worker())
            self.idle.append(self.alive[-1])
        job = _Job(args, self.idle.pop())
        try:
            job.worker.jobs.send(args)
        except OSError:  # the worker died while idle
            self._fail(job, f"decode worker died ({job.worker.exit_status()}) before "
                            f"decoding: {args[0]}")
        return job

    def _receive(self, window: deque[_Job]) -> None:
        """Wait for messages: always from the first file's worker, from the others while
        fewer than ``ahead`` of their segments are buffered."""
        head = window[0]
        now = time.monotonic()
        if head.deadline is None:
            head.deadline = now + (self.timeout if head.worker.ready else START_SECONDS)
        listen = [head]
        if sum(len(j.segments) for j in window if j is not head) < self.ahead:
            listen += [j for j in window if j is not head and j.result is None]
        by_conn = {j.worker.msgs: j for j in listen}
        ready = wait(list(by_conn), timeout=max(0.0, head.deadline - now))
        if not ready:
            if head.worker.ready:
                reason = (f"decode timed out after {self.timeout:g} s without progress (a "
                          "pipe or stalled storage? if it is only slow, raise "
                          "--decode-timeout)")
            else:
                reason = f"decode worker did not start within {START_SECONDS:g} s"
            self._fail(head, f"{reason}: {head.args[0]}")
            return
        for conn in ready:
            job = by_conn[conn]
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):
                self._fail(job, f"decode worker died ({job.worker.exit_status()}) while "
                                f"decoding: {job.args[0]}")
                continue
            if job is head:
                head.deadline = time.monotonic() + self.timeout
            if kind == "ready":
                job.worker.ready = True
                continue
            job.feed(kind, payload)
            if job.result is not None:
                self.idle.append(job.worker)
                job.worker = None

    def _fail(self, job: _Job, reason: str) -> None:
        """End ``job`` with ``reason`` and retire its worker (a new one starts on demand)."""
        job.worker.stop()
        self.alive.remove(job.worker)
        # Reap the retired workers that have exited (poll() collects their status).
        self.stopped = [w for w in self.stopped if w.proc.poll() is None] + [job.worker]
        job.worker = None
        job.segments = []
        job.result = reason

    def close(self) -> None:
        """Stop every worker. A killed process stuck in the kernel (a hung mount) may not
        exit at once: it is waited for briefly, never indefinitely."""
        for w in self.alive:
            w.stop()
        stopped = self.stopped + self.alive
        self.alive, self.idle, self.stopped = [], [], []
        for w in stopped:
            try:
                w.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _serve(jobs_fd: int, msgs_fd: int) -> None:
    """The worker's loop: decode each job received, send its messages, until the parent
    closes the pipe or goes away."""
    # Ctrl-C reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    jobs = Connection(jobs_fd, writable=False)
    msgs = Connection(msgs_fd, readable=False)
    # Import what decoding needs before saying so: the parent times decoding only, not a
    # slow interpreter start on a loaded machine.
    import scipy.signal  # noqa: F401
    import soundfile  # noqa: F401

    try:
        msgs.send(("ready", None))
        while True:
            args = jobs.recv()
            for message in decode_job(*args):
                msgs.send(message)
    except (EOFError, BrokenPipeError):
        pass


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
