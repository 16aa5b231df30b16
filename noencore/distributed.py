"""Process-group helpers for the stages that split their work over ranks (training and
evaluation).

Under a launcher (``torchrun``, ``deepspeed``) the environment names this process's
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Each rank works on its own device
(``cuda:LOCAL_RANK`` on a GPU node, never GPU 0 for all), scores its share of the
items, and the results meet on rank 0, which alone writes files.

Every tensor handed to a collective here is on :func:`comm_device`: NCCL moves only
CUDA tensors of the rank's current GPU (gloo forgives CPU tensors, so a CPU test would
not notice). All of them are made by :func:`_to_comm`, so that a test can check them.
Without a process group (one process) every helper is the identity. Nothing here
imports DeepSpeed: a plain ``torch.distributed`` group is enough for data-parallel work
(the engine's DeepSpeed group is such a group too).
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from noencore.errors import NoencoreError

T = TypeVar("T")


def launched() -> bool:
    """True under a launcher that started more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True inside an initialised process group (of any size)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """This process's device, known before anything is loaded.

    An explicit ``device`` wins ("cuda" without an index means this rank's GPU). By
    default: ``cuda:LOCAL_RANK`` under a launcher, the current GPU in one process, the
    CPU where there is no CUDA.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if launched()
                           else torch.cuda.current_device())
    return dev


def join(device: torch.device) -> tuple[int, int]:
    """Join the launcher's process group unless this process already belongs to one
    (NCCL for a CUDA ``device``, gloo otherwise); returns ``(rank, world_size)``.

    In a group, a CUDA ``device`` first becomes the current one, so that NCCL and every
    tensor made on "cuda" use this rank's GPU. Without a launcher: ``(0, 1)`` and no group.
    """
    import torch.distributed as dist

    if not (launched() or is_distributed()):
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank(), world_size()


def comm_device() -> torch.device:
    """The device the process group's collectives run on: this rank's current GPU under
    NCCL, the CPU under gloo."""
    import torch.distributed as dist

    if dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks, on ``t``'s device; the reduction itself runs on
    :func:`comm_device` (a CPU tensor under NCCL is copied there and back)."""
    if world_size() == 1:
        return t
    import torch.distributed as dist

    buf = t.to(comm_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(t.device)


def barrier() -> None:
    """Wait until every rank got here (nothing in one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def _to_comm(x: np.ndarray) -> torch.Tensor:
    """A copy of host array ``x`` on :func:`comm_device` (the one way tensors get there)."""
    return torch.from_numpy(np.array(x, copy=True)).to(comm_device())


def rank_share(n: int) -> np.ndarray:
    """int64 [<= ceil(n / world)]: the items ``rank, rank + world, ...`` of ``0 .. n-1``
    that this rank handles (all of them in one process)."""
    return np.arange(rank(), n, world_size(), dtype=np.int64)


def gather_arrays(arrays: Mapping[str, np.ndarray], dst: int = 0
                  ) -> list[dict[str, np.ndarray]] | None:
    """Every rank's named numpy arrays, in rank order, on rank ``dst``; None elsewhere.

    Any dtypes and sizes (they may differ between ranks): each rank's arrays travel as
    one ``.npz`` byte buffer, so NCCL's lack of 16-bit integer and bool types does not
    matter. In one process: ``[dict(arrays)]``.
    """
    if not is_distributed():
        return [dict(arrays)]
    import torch.distributed as dist

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = np.frombuffer(buf.getbuffer(), np.uint8)
    size = _to_comm(np.array([payload.size], np.int64))
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.cpu().numpy()[0]) for s in sizes]
    # gather needs equal shapes: pad every buffer to the longest
    padded = np.zeros(max(counts), np.uint8)
    padded[:payload.size] = payload
    mine = _to_comm(padded)
    parts = [torch.empty_like(mine) for _ in counts] if rank() == dst else None
    dist.gather(mine, parts, dst=dst)
    if parts is None:
        return None
    out = []
    for part, count in zip(parts, counts):
        with np.load(io.BytesIO(part.cpu().numpy()[:count].tobytes()), allow_pickle=False) as z:
            out.append({k: z[k] for k in z.files})
    return out


def gather_items(rows: np.ndarray, items: np.ndarray, n: int, dst: int = 0) -> np.ndarray | None:
    """Per-item rows computed by their ranks, assembled in item order on rank ``dst``.

    rows: [len(items), ...] this rank's values for ``items`` (int64, from
    :func:`rank_share`); returns [n, ...] (dtype of ``rows``) on ``dst``, None elsewhere.
    Every item 0..n-1 must be held by exactly one rank.
    """
    parts = gather_arrays({"rows": np.asarray(rows), "items": np.asarray(items, np.int64)}, dst)
    if parts is None:
        return None
    items_all = np.concatenate([p["items"] for p in parts])
    if np.sort(items_all).tolist() != list(range(n)):
        raise NoencoreError(f"ranks returned items {sorted(items_all.tolist())} for {n} items: "
                            "every rank must handle its own rank_share(n)")
    out = np.empty((n, *parts[0]["rows"].shape[1:]), parts[0]["rows"].dtype)
    for p in parts:
        out[p["items"]] = p["rows"]
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small results, not tensors)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    data = np.frombuffer(pickle.dumps(obj), np.uint8) if rank() == src else np.zeros(0, np.uint8)
    size = _to_comm(np.array([data.size], np.int64))
    dist.broadcast(size, src=src)
    buf = _to_comm(data if rank() == src else np.zeros(int(size.cpu().numpy()[0]), np.uint8))
    dist.broadcast(buf, src=src)
    return obj if rank() == src else pickle.loads(buf.cpu().numpy().tobytes())


def on_rank0(fn: Callable[[], T], *, share: bool = True) -> T | None:
    """Run ``fn()`` on rank 0 only (reports, files); the other ranks wait for it.

    With ``share`` every rank returns rank 0's result, else the others return None. If
    ``fn`` raises, rank 0 re-raises and the other ranks raise a NoencoreError naming the
    error, instead of waiting for a result that never comes.
    """
    if not is_distributed():
        return fn()
    if rank() == 0:
        try:
            out = fn()
        except BaseException as exc:
            broadcast_object(("error", f"{type(exc).__name__}: {exc}"))
            raise
        broadcast_object(("ok", out if share else None))
        return out
    status, value = broadcast_object(None)
    if status == "error":
        raise NoencoreError(f"rank 0 failed ({value}); see its output")
    return value


def leave() -> None:
    """Leave the process group (at the end of a command), once every rank got here."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
