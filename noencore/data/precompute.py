"""Corpus -> token shards: decode in worker processes, encode in batches, commit per group.

The output depends only on the manifest (its order and the files' content), never on
timing, so an interrupted run resumes to the same bytes as an uninterrupted one:

- items are encoded and written in manifest order, in *chunks*: a chunk takes items
  until 4 x batch_size segments wait, then encodes them all (a short segment is padded
  to whole seconds, and batched with segments of the same padded length) and commits.
  Chunking restarts at each commit, so a resumed run forms the very same batches (the
  encoder's float sums vary slightly with the batch, enough to flip a near-tie code);
  resuming with another --batch-size still works but may change such codes;
- shard files only grow; a segment goes to the current shard unless it would push it
  past ``shard_frames``, so shard boundaries follow the sequence alone;
- a group of finished items is committed by fsync-ing its codes and then appending
  its index lines to ``journal.jsonl``; on resume, shard bytes the journal does not
  cover are cut off and the items after the last commit are encoded again;
- failed items are never committed: each run tries them again and writes the failures
  report from scratch;
- the run ends by writing ``index.jsonl``, ``failures.jsonl`` and, last,
  ``checksums.json`` (the commit mark), each through a temporary name and a rename.

A finished directory that the manifest adds nothing to is left untouched.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from noencore.data import layout
from noencore.data.codec import Codec
from noencore.data.manifest import Failure, ManifestItem, read_manifest
from noencore.data.workers import DecodePool
from noencore.errors import NoencoreError

DEFAULT_CODEC = "facebook/encodec_32khz"
SHARD_FRAMES = 1 << 24  # 16 Mi frames x 4 codebooks x int16 = 128 MiB per shard file


@dataclass
class PrecomputeReport:
    """What a run did. ``failures``: records of the failures report (id, line, source, reason)."""

    out_dir: Path
    encoded: int = 0
    skipped: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    segments: int = 0
    hours: float = 0.0
    encoded_hours: float = 0.0
    changed: bool = False
    seconds: float = 0.0


def _fault(point: str) -> None:
    """Fault injection for the kill/resume tests: ``NOENCORE_FAULT=point:n`` SIGKILLs this
    process the n-th time it reaches ``point``. Unset in normal use."""
    spec = os.environ.get("NOENCORE_FAULT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    left = int(count or 1) - 1
    os.environ["NOENCORE_FAULT"] = f"{name}:{left}"
    if left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class _Work:
    """A decoded item waiting for its segments' codes."""

    item: ManifestItem
    sha256: str
    segments: list[np.ndarray]  # float32 [samples], each padded to whole frames
    frames: list[int]  # true frames of each segment
    codes: list[np.ndarray | None]  # int16 [frames, n_q] once encoded


class _Writer:
    """Appends committed codes to the shard files and index lines to the journal."""

    def __init__(self, out: Path, n_q: int, records: list[dict[str, Any]], shard_frames: int):
        self.out, self.n_q, self.shard_frames = out, n_q, shard_frames
        self.records = records
        self.ids = {r["id"] for r in records}
        rows: dict[int, int] = {}
        for r in records:
            rows[r["shard"]] = max(rows.get(r["shard"], 0), r["offset"] + r["frames"])
        self.shard = max(rows) if rows else 0
        self.rows = rows.get(self.shard, 0)
        # Drop what no commit covers: the tail of the current shard, later shard files.
        for f in out.glob("shard-*.codes"):
            num = int(f.stem.split("-")[1])
            if num > self.shard:
                f.unlink()
        path = out / layout.shard_name(self.shard)
        mode = "r+b" if path.exists() else "w+b"
        self.file = open(path, mode)  # noqa: SIM115 (kept open across commits)
        self.file.truncate(self.rows * n_q * layout.CODE_BYTES)
        self.file.seek(0, os.SEEK_END)
        self.journal = open(out / layout.JOURNAL, "ab")  # noqa: SIM115

    def commit(self, works: list[_Work], segment_seconds: float, sample_rate: int) -> None:
        lines = []
        for w in works:
            seg_samples = round(segment_seconds * sample_rate)
            for k, (codes, frames) in enumerate(zip(w.codes, w.frames)):
                if self.rows and self.rows + frames > self.shard_frames:
                    self._next_shard()
                data = codes.tobytes()
                self.file.write(data)
                rec = {"id": w.item.id, "segment": k, "start_s": k * seg_samples / sample_rate,
                       "frames": frames, "shard": self.shard, "offset": self.rows,
                       "codes_sha256": hashlib.sha256(data).hexdigest(),
                       "caption": w.item.caption, "split": w.item.split, "sha256": w.sha256,
                       "source": w.item.source, "meta": w.item.meta}
                self.rows += frames
                self.records.append(rec)
                lines.append(rec)
            self.ids.add(w.item.id)
        self.file.flush()
        os.fsync(self.file.fileno())
        _fault("data-written")
        self.journal.write(layout.jsonl_bytes(lines))
        self.journal.flush()
        os.fsync(self.journal.fileno())
        _fault("committed")

    def _next_shard(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shard += 1
        self.rows = 0
        self.file = open(self.out / layout.shard_name(self.shard), "w+b")  # noqa: SIM115
        layout.fsync_dir(self.out)

    def close(self) -> None:
        self.file.close()
        self.journal.close()


class _Encoder:
    """Batches segments of equal length through the codec; keeps items in manifest order."""

    def __init__(self, codec: Any, batch_size: int, dtype: Any,
                 on_batch: Callable[[int], None] | None = None):
        self.codec, self.batch_size, self.dtype = codec, batch_size, dtype
        self.queue: deque[_Work] = deque()
        self.seconds = 0.0  # time spent inside the codec
        self.on_batch = on_batch  # called with the frames of each encoded batch

    def pending_segments(self) -> int:
        return sum(len(w.codes) for w in self.queue)

    def encode_all(self) -> None:
        """Encode every queued segment: same-length segments in batches of batch_size."""
        import torch

        groups: dict[int, list[tuple[_Work, int]]] = {}
        for w in self.queue:
            for k, c in enumerate(w.codes):
                if c is None:
                    groups.setdefault(w.segments[k].shape[0], []).append((w, k))
        for members in groups.values():
            for b in range(0, len(members), self.batch_size):
                chunk = members[b:b + self.batch_size]
                wav = torch.from_numpy(np.stack([w.segments[k] for w, k in chunk]))[:, None]
                t0 = time.perf_counter()
                codes = self.codec.encode(wav, self.dtype).cpu()
                self.seconds += time.perf_counter() - t0
                # [B, n_q, F] long -> frames-major int16 [F, n_q] per segment.
                block = codes.to(torch.int16).transpose(1, 2).contiguous().numpy()
                for (w, k), c in zip(chunk, block):
                    w.codes[k] = c[:w.frames[k]]
                    w.segments[k] = None  # free the audio once encoded
                if self.on_batch is not None:
                    self.on_batch(sum(w.frames[k] for w, k in chunk))

    def pop_done(self) -> list[_Work]:
        done = []
        while self.queue and all(c is not None for c in self.queue[0].codes):
            done.append(self.queue.popleft())
        return done


def _segments(pieces: list[np.ndarray], seg_samples: int, hop: int,
              bucket: int) -> tuple[list[np.ndarray], list[int]]:
    """Pad the decoded pieces of one item (float32 [seg_samples] each, the last one
    shorter) and count their true frames. A final piece shorter than one frame is dropped
    (< 20 ms at 50 frames/s). A short piece is padded up to a multiple of ``bucket``
    frames (capped at a full segment): few distinct shapes let tails share batches and
    spare the backend a kernel build per length; the codec pads with zeros itself, so
    codes barely change."""
    full = -(-seg_samples // hop)
    segs, frames = [], []
    for k, piece in enumerate(pieces):
        if piece.shape[0] < hop and k > 0:
            break
        f = -(-piece.shape[0] // hop)
        padded = min(-(-f // bucket) * bucket, full) * hop
        if padded != piece.shape[0]:
            piece = np.pad(piece, (0, padded - piece.shape[0]))
        segs.append(np.ascontiguousarray(piece))
        frames.append(f)
    return segs, frames


def _check_output(out: Path) -> None:
    """Refuse an output that is a file, or a directory holding shard files this tool did
    not write (they would be overwritten or dropped): one line naming it."""
    if out.exists() and not out.is_dir():
        raise NoencoreError(f"{out}: exists and is not a directory; give a new or empty "
                            "directory for the shards")
    if not out.is_dir() or (out / layout.HEADER).exists():
        return  # new, or one of ours (the header is checked before anything is written)
    ours = [layout.INDEX, layout.FAILURES, layout.CHECKSUMS, layout.JOURNAL]
    found = sorted(p.name for p in out.iterdir()
                   if p.name in ours or (p.name.startswith("shard-") and p.suffix == ".codes"))
    if found:
        raise NoencoreError(f"{out}: holds {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}"
                            f" but no {layout.HEADER}: not shards this tool wrote, and precompute "
                            "would overwrite them; give a new or empty directory")


def _records(rows: list[Any], path: Path) -> list[dict[str, Any]]:
    """Index or journal records, each checked for the fields the writer relies on."""
    need = ("id", "segment", "frames", "shard", "offset")
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or any(k not in r for k in need):
            raise NoencoreError(f"{path}: line {n} is not a segment record (needs "
                                f"{', '.join(need)}); this directory was not written by "
                                "`noencore precompute`: give a new or empty directory")
    return rows


def _load_state(out: Path) -> list[dict[str, Any]]:
    """Committed index records: the journal of an unfinished run, else the finished index."""
    journal = out / layout.JOURNAL
    if journal.exists():
        data = journal.read_bytes()
        # A torn last line (cut by a crash mid-write) was never committed: drop it.
        lines = data.split(b"\n")
        out_records = []
        import json

        for line in lines[:-1]:
            try:
                out_records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return _records(out_records, journal)
    if (out / layout.INDEX).exists():
        return _records(layout.read_jsonl(out / layout.INDEX), out / layout.INDEX)
    return []


def _finish(out: Path, records: list[dict[str, Any]], failures: list[dict[str, Any]]) -> None:
    layout.atomic_write(out / layout.INDEX, layout.jsonl_bytes(records))
    _fault("index-written")
    layout.atomic_write(out / layout.FAILURES, layout.jsonl_bytes(failures))
    names = [layout.HEADER, layout.INDEX, layout.FAILURES]
    names += sorted(p.name for p in out.glob("shard-*.codes"))
    files = {n: {"sha256": layout.sha256_file(out / n), "size": (out / n).stat().st_size}
             for n in names}
    layout.atomic_write(out / layout.CHECKSUMS,
                        layout.jsonl_bytes([{"files": files}]))
    (out / layout.JOURNAL).unlink(missing_ok=True)
    layout.fsync_dir(out)


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def precompute(manifest: str | Path, out_dir: str | Path, *, codec: str | Codec = DEFAULT_CODEC,
               segment_seconds: float = 30.0, batch_size: int = 8, workers: int | None = None,
               strict: bool = False, device: str = "cpu", encode_dtype: str = "fp32",
               shard_frames: int = SHARD_FRAMES, progress: bool = True,
               decode_timeout: float = 120.0) -> PrecomputeReport:
    """Encode the audio of ``manifest`` into token shards in ``out_dir`` (see the module doc).

    codec: a spec for ``load_codec`` (hub id, local checkpoint, "musicgen-32khz", "tiny"),
    or a loaded ``Codec`` (its ``spec`` goes into the header) to encode several corpora
    without reloading it.
    segment_seconds: window length the audio is cut into (MusicGen trains on 30 s).
    batch_size: segments per encoder call. workers: decoding processes (0 = inline;
    None = up to 4, leaving a core to the encoder). strict: raise on the first failure
    instead of recording it. encode_dtype: "fp32" (default) or "bf16" (encoder under
    autocast; the RVQ stays fp32). decode_timeout: seconds a worker may decode one file
    without producing audio before the file is recorded as failed ("decode timed out")
    and its worker replaced (a named pipe, a stalled mount); with workers=0 decoding
    has no time limit (a path that is not a regular file is refused before it is opened). Resumes an interrupted run; encodes only items that are not in
    the shards yet. Returns a ``PrecomputeReport``.
    """
    import torch

    t_start = time.perf_counter()
    if segment_seconds <= 0 or batch_size <= 0 or decode_timeout <= 0:
        raise NoencoreError("--segment-seconds, --batch-size and --decode-timeout must be "
                            "positive")
    dtypes = {"fp32": None, "bf16": torch.bfloat16}
    if encode_dtype not in dtypes:
        raise NoencoreError(f"encode dtype {encode_dtype!r}: choose fp32 or bf16")
    items, manifest_failures = read_manifest(manifest)
    if strict and manifest_failures:
        raise NoencoreError(f"{manifest_failures[0].reason} (--strict)")
    out = Path(out_dir)
    _check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    # Lock the directory itself (no lock file left behind) for the whole run.
    lock = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise NoencoreError(f"{out}: another precompute is writing this directory; wait for "
                            "it to finish") from None
    try:
        loaded = codec if isinstance(codec, Codec) else None
        opt = _Options(codec if loaded is None else loaded.spec, loaded, float(segment_seconds),
                       batch_size,
                       _default_workers() if workers is None else workers, strict, device,
                       dtypes[encode_dtype], shard_frames, progress, float(decode_timeout))
        return _run(items, manifest_failures, out, opt, t_start)
    finally:
        os.close(lock)


@dataclass(frozen=True)
class _Options:
    codec: str
    loaded: Codec | None
    segment_seconds: float
    batch_size: int
    workers: int
    strict: bool
    device: str
    dtype: Any  # torch.dtype or None (fp32)
    shard_frames: int
    progress: bool
    decode_timeout: float


class _AudioProgress:
    """precompute's bar, in seconds of audio encoded (moved per encoder batch, so it moves
    within a long file), with items done and failed beside it. The total is the audio
    decoded so far plus, for the items not decoded yet, the mean length of those that were
    (decoding runs ahead of the encoder: a lone file's length is known before its first
    batch)."""

    def __init__(self, n_items: int, frame_seconds: float, disable: bool):
        from noencore.progress import progress

        self.n_items, self.frame_seconds = n_items, frame_seconds
        self.decoded_frames, self.n_decoded, self.n_failed, self.n_done = 0, 0, 0, 0
        self.bar = progress(total=None, desc="precompute", unit="s", unit_scale=True,
                            disable=disable,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "s of audio [{elapsed}<{remaining}, {rate_fmt}{postfix}]")
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"items {self.n_done}/{self.n_items}, failed {self.n_failed}",
                                 refresh=False)

    def _retotal(self) -> None:
        left = self.n_items - self.n_decoded - self.n_failed
        seconds = self.decoded_frames * self.frame_seconds
        self.bar.total = seconds + left * seconds / max(self.n_decoded, 1)
        self.bar.refresh()

    def decoded(self, frames: int) -> None:
        self.decoded_frames += frames
        self.n_decoded += 1
        self._retotal()

    def failed(self, n_failed: int) -> None:
        self.n_failed = n_failed
        self._postfix()
        self._retotal()

    def encoded(self, frames: int) -> None:
        self.bar.update(frames * self.frame_seconds)

    def items_done(self, n: int, n_failed: int) -> None:
        self.n_done, self.n_failed = self.n_done + n, n_failed
        self._postfix()
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _same_codec_as_begun(codec: Codec, header: dict, head_file: Path, shape: tuple) -> None:
    """Adding to shards begun earlier: the codec loaded now must be the one they were begun
    with (the same spec can name other weights: a hub repo updated, a folder rewritten)."""
    if (codec.sample_rate, codec.n_q, codec.hop) != shape:
        raise NoencoreError(f"codec {codec.spec} does not match {head_file}")
    begun = header.get("codec_identity")
    if begun and begun.get("weights_sha256") != codec.identity()["weights_sha256"]:
        raise NoencoreError(f"{head_file}: these shards were begun with other weights of "
                            f"codec {codec.spec!r} (the file or hub repo changed since); "
                            "write into a new directory")


def _run(items: list[ManifestItem], manifest_failures: list[Failure], out: Path,
         opt: _Options, t_start: float) -> PrecomputeReport:
    from noencore.data.codec import load_codec

    codec_spec, segment_seconds, batch_size = opt.codec, opt.segment_seconds, opt.batch_size

    def get_codec() -> Codec:
        return opt.loaded if opt.loaded is not None else load_codec(codec_spec, opt.device)

    codec = None
    head_file = out / layout.HEADER
    if head_file.exists():
        header = layout.check_header(layout.read_json(head_file, "header"), head_file)
        if header["codec"] != codec_spec or header["segment_seconds"] != float(segment_seconds):
            raise NoencoreError(
                f"{out} holds shards of --codec {header['codec']} --segment-seconds "
                f"{header['segment_seconds']:g}; run with those options to add to it, or "
                "write into a new directory")
    else:
        codec = get_codec()
        header = layout.make_header(codec_spec, codec.sample_rate, codec.frame_rate,
                                    codec.n_q, codec.card, segment_seconds, codec.identity())
        layout.atomic_write(head_file, layout.jsonl_bytes([header]))
    sample_rate, n_q = int(header["sample_rate"]), int(header["n_q"])
    hop = sample_rate // int(header["frame_rate"])
    seg_samples = round(segment_seconds * sample_rate)
    chunk_segments = 4 * batch_size

    records = _load_state(out)
    done_ids = {r["id"] for r in records}
    todo = [it for it in items if it.id not in done_ids]
    report = PrecomputeReport(out, skipped=len(items) - len(todo))
    failures: list[Failure] = list(manifest_failures)

    writer: _Writer | None = None
    encoder: _Encoder | None = None
    # Workers are separate interpreters (started by exec) and inherit none of this
    # process's descriptors, so none keeps the directory lock past a killed run.
    decoder = DecodePool(opt.workers, opt.decode_timeout, ahead=2 * opt.workers + 2)
    decoded = decoder.map([(str(it.path), sample_rate, hop, seg_samples) for it in todo])
    bar = _AudioProgress(len(todo), hop / sample_rate, disable=not opt.progress or not todo)

    def commit() -> None:
        encoder.encode_all()
        done = encoder.pop_done()
        if done:
            writer.commit(done, segment_seconds, sample_rate)
            report.encoded += len(done)
            report.encoded_hours += sum(sum(w.frames) for w in done) * hop / sample_rate / 3600
            bar.items_done(len(done), len(failures))

    try:
        for item, result in zip(todo, decoded):
            if isinstance(result, str):
                failures.append(Failure(item.id, item.line, item.source, result))
                if opt.strict:
                    raise NoencoreError(f"item {item.id} ({item.source}): {result} (--strict)")
                bar.failed(len(failures))
                continue
            if writer is None:
                if codec is None:
                    codec = get_codec()
                _same_codec_as_begun(codec, header, head_file, (sample_rate, n_q, hop))
                # A modifying run: un-finish the directory before touching anything.
                (out / layout.CHECKSUMS).unlink(missing_ok=True)
                layout.fsync_dir(out)
                _fault("unfinished")
                if not (out / layout.JOURNAL).exists():
                    layout.atomic_write(out / layout.JOURNAL, layout.jsonl_bytes(records))
                writer = _Writer(out, n_q, records, opt.shard_frames)
                encoder = _Encoder(codec, batch_size, opt.dtype, on_batch=bar.encoded)
            pieces, digest = result
            segs, frames = _segments(pieces, seg_samples, hop, int(header["frame_rate"]))
            bar.decoded(sum(frames))
            encoder.queue.append(_Work(item, digest, segs, frames, [None] * len(segs)))
            # A chunk closes once enough segments wait; its batches depend only on its own
            # items, so a resumed run (which restarts at a chunk boundary) forms the same
            # batches and gets the same bits (the encoder's float sums depend slightly on
            # the batch, and a near tie in the RVQ could flip a code).
            if encoder.pending_segments() >= chunk_segments:
                commit()
        if encoder is not None:
            commit()
    finally:
        bar.close()
        decoder.close()
        if writer is not None:
            writer.close()

    failure_records = [f.record() for f in failures]
    report.failures = failure_records
    report.segments = len(records)
    report.hours = sum(r["frames"] for r in records) * hop / sample_rate / 3600
    finished = ((out / layout.CHECKSUMS).exists() and not (out / layout.JOURNAL).exists()
                and (out / layout.FAILURES).exists()
                and (out / layout.FAILURES).read_bytes() == layout.jsonl_bytes(failure_records))
    if not finished:
        (out / layout.CHECKSUMS).unlink(missing_ok=True)
        _finish(out, records, failure_records)
        report.changed = True
    report.seconds = time.perf_counter() - t_start
    return report
