"""Teacher-forced per-token statistics of a model on a set of shards, batched.

Each item is cut into windows of ``frames`` frames (``noencore.data.iter_batches``,
natural order; under a launcher each rank takes its share); a batch of windows goes
through the model adapter
(``MusicGenModel.codebook_rows``: hidden states before the K codebook heads, only the
positions valid under the delay pattern and the mask) and then through
``noencore.ops.token_stats`` (no-grad: NLL, top-1, Min-K%++ moments), so the
``[N, card]`` logits are never held beyond one chunk. The LM forward runs under bf16
autocast when asked (the fast path on GPUs and on CPUs with AVX-512 bf16); the
statistics themselves are always computed in fp32.

An item's statistics do not depend on the batch it shares: audiocraft's
cross-attention has no mask, so the zero padding of a batch's text conditions changes
what each row hears; every batch is therefore padded to one fixed condition length (the
condition cache's longest, ``ConditionCache.length``).
Tokens are kept in one canonical order, by (item, codebook, position in the item),
whatever the batch size or the number of ranks, so that every sum over them is taken
in the same order: the ranks' shares (:func:`gather_set_stats`) assemble into the
arrays one process gives.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noencore.errors import NoencoreError
from noencore.evaluation.mia import ItemTokens, compressed_size
from noencore.fileio import sha256_file

#: per-token arrays saved per set in token_stats.npz, and their dtypes
_DTYPES = {"nll": np.float32, "correct": np.bool_, "logp_mean": np.float32,
           "logp_var": np.float32, "item": np.int64, "codebook": np.int16, "position": np.int32}
_FIELDS = tuple(_DTYPES)


@dataclass
class SetStats:
    """Per-token statistics of one set, flattened over items and codebooks.

    nll, logp_mean, logp_var: float32 [N]; correct: bool [N]; item: int64 [N] (index of
    the item within the set); codebook: int16 [N]; position: int32 [N] (frame of the
    token within its item; None in files written before it was stored); n_items, n_q:
    ints; sizes: int64 [n_items] zlib-compressed bytes of each item's int16 codes; ids:
    [n_items] source ids. ``collect_set_stats`` and :meth:`merge` sort the tokens by
    (item, codebook, position).
    """

    nll: np.ndarray
    correct: np.ndarray
    logp_mean: np.ndarray
    logp_var: np.ndarray
    item: np.ndarray
    codebook: np.ndarray
    n_items: int
    n_q: int
    sizes: np.ndarray
    ids: list[str] = field(default_factory=list)
    position: np.ndarray | None = None

    @classmethod
    def merge(cls, parts: list[SetStats]) -> SetStats:
        """The statistics of one set scored in disjoint parts (one per rank), as one set
        in canonical token order: equal to scoring it whole."""
        first = parts[0]
        for p in parts[1:]:
            if (p.n_items, p.n_q, p.ids) != (first.n_items, first.n_q, first.ids):
                raise ValueError(f"parts cover different sets ({p.n_items} items {p.ids[:2]}... "
                                 f"vs {first.n_items} items {first.ids[:2]}...)")
        arrays = _canonical({f: np.concatenate([getattr(p, f) for p in parts])
                             for f in _FIELDS})
        return cls(**arrays, n_items=first.n_items, n_q=first.n_q, sizes=first.sizes,
                   ids=list(first.ids))

    def tokens(self) -> ItemTokens:
        return ItemTokens(nll=self.nll, item=self.item, n_items=self.n_items,
                          logp_mean=self.logp_mean, logp_var=self.logp_var,
                          codebook=self.codebook)

    def summary(self) -> dict[str, Any]:
        """Set-level numbers: mean NLL (nats/token), top-1 accuracy, per codebook too."""
        per_k = []
        for k in range(self.n_q):
            sel = self.codebook == k
            per_k.append({"codebook": k, "tokens": int(sel.sum()),
                          "nll": _mean(self.nll[sel]), "accuracy": _mean(self.correct[sel])})
        return {"items": self.n_items, "tokens": int(self.nll.size), "nll": _mean(self.nll),
                "accuracy": _mean(self.correct), "per_codebook": per_k}


def _canonical(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-token arrays sorted by (item, codebook, position)."""
    order = np.lexsort((arrays["position"], arrays["codebook"], arrays["item"]))
    return {f: v[order] for f, v in arrays.items()}


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x, dtype=np.float64)) if x.size else None


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("bf16" | "fp32") on ``device`` (None = off)."""
    if precision == "fp32":
        return None
    if precision != "bf16":
        raise ValueError(f"precision must be 'bf16' or 'fp32', not {precision!r}")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None  # pre-Ampere GPUs: bf16 is emulated and slower than fp32
    return torch.bfloat16


def _pad_conditions(cond: tuple[torch.Tensor, torch.Tensor], length: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds [B, L, D], mask bool [B, L])`` zero-padded to ``length`` >= L positions."""
    embeds, mask = cond
    if embeds.shape[1] > length:
        raise ValueError(f"a text condition has {embeds.shape[1]} positions, more than the "
                         f"fixed condition length {length}")
    out_e = embeds.new_zeros(embeds.shape[0], length, embeds.shape[2])
    out_m = mask.new_zeros(mask.shape[0], length)
    out_e[:, :embeds.shape[1]] = embeds
    out_m[:, :mask.shape[1]] = mask
    return out_e, out_m


@torch.no_grad()
def collect_set_stats(model: Any, shards: Any, conditions: Any, *, batch_size: int = 16,
                      frames: int | None = None, precision: str = "bf16",
                      progress: bool = True, desc: str = "tokens", rank: int = 0,
                      world: int = 1, cond_length: int | None = None) -> SetStats:
    """Per-token statistics of ``model`` (a ``MusicGenModel``) on every item of ``shards``.

    With ``world`` > 1, this rank scores only its share of the windows (every
    ``world``-th); every rank runs the same number of forward passes of the same size
    (rows beyond a rank's share are empty: no token, no cache entry needed), as
    collectives inside the model's forward (DeepSpeed ZeRO-3) require. The arrays hold
    this rank's tokens; ``item`` still indexes all of ``shards``; :func:`gather_set_stats`
    (or :meth:`SetStats.merge`) assembles the ranks' shares.

    Args:
        shards: a ``TokenShards`` (view) with >= 1 item.
        conditions: a ``ConditionCache`` holding every caption of ``shards``.
        batch_size: windows per forward pass (1 = the per-item loop).
        frames: window length; default the longest item (one window per item).
        precision: "bf16" (autocast the LM forward) or "fp32".
        cond_length: text-condition positions of every batch (default
            ``conditions.length``, the longest condition of the cache: every set scored
            from one cache is padded alike); sets from different caches that are compared
            with each other (members, non-members) need the same.
    """
    from noencore.data.batches import iter_batches
    from noencore.ops import token_stats
    from noencore.progress import progress as progress_bar

    n = len(shards)
    if n == 0:
        raise NoencoreError(f"{shards.path}: the set is empty; check its split or id list")
    if shards.header.n_q != model.n_q:
        raise NoencoreError(f"{shards.path}: shards have n_q={shards.header.n_q} codebooks, the "
                            f"model {model.spec!r} {model.n_q}: they come from different codecs")
    all_frames = shards.frames
    frames = int(frames or all_frames.max())
    device = model.device
    cast = autocast_dtype(precision, device)
    cond_length = cond_length or conditions.length
    parts: dict[str, list[np.ndarray]] = {f: [] for f in _FIELDS}
    n_windows = -(-int(np.maximum(1, -(-all_frames // frames)).sum()) // world)
    batches = iter_batches(shards, batch_size, frames, seed=0, shuffle=False, rank=rank,
                           world_size=world)
    bar = progress_bar(batches, total=-(-n_windows // batch_size), desc=desc, unit="batch",
                       disable=not progress, leave=False)
    for batch in bar:
        cond = _pad_conditions(conditions.batch(batch.captions,
                                                present=(batch.index >= 0).tolist()), cond_length)
        with torch.autocast(device.type, dtype=cast or torch.float32, enabled=cast is not None):
            rows = model.codebook_rows(batch, cond)
        index = batch.index.to(device)
        start = batch.start.to(device)
        for k, r in enumerate(rows):
            st = token_stats(r.hidden, r.weight, r.targets)
            parts["nll"].append(st.nll.cpu().numpy())
            parts["correct"].append(st.correct.cpu().numpy())
            parts["logp_mean"].append(st.logp_mean.cpu().numpy())
            parts["logp_var"].append(st.logp_var.cpu().numpy())
            parts["item"].append(index[r.item].cpu().numpy().astype(np.int64))
            parts["codebook"].append(np.full(r.targets.numel(), k, np.int16))
            parts["position"].append((start[r.item] + r.time).cpu().numpy().astype(np.int32))
    arrays = _canonical({f: np.concatenate(v).astype(_DTYPES[f]) if v else np.zeros(0, _DTYPES[f])
                         for f, v in parts.items()})
    sizes = np.array([compressed_size(shards.codes(i).numpy()) for i in range(n)], np.int64)
    return SetStats(**arrays, n_items=n, n_q=model.n_q, sizes=sizes, ids=list(shards.ids))


def gather_set_stats(stats: SetStats, dst: int = 0) -> SetStats | None:
    """Under a process group: every rank's share of one set (from ``collect_set_stats``
    with ``rank``/``world``) assembled on rank ``dst`` (None on the others); in one
    process: ``stats`` itself."""
    from noencore.distributed import gather_arrays, is_distributed

    if not is_distributed():
        return stats
    shares = gather_arrays({f: getattr(stats, f) for f in _FIELDS}, dst)
    if shares is None:
        return None
    return SetStats.merge([SetStats(**a, n_items=stats.n_items, n_q=stats.n_q, sizes=stats.sizes,
                                    ids=stats.ids) for a in shares])


def save_stats(path: str | os.PathLike, stats: dict[str, SetStats], meta: dict[str, Any]) -> str:
    """Write every set's arrays to one ``.npz`` (atomic); returns its sha256.

    ``meta`` (model spec, shards path...) is stored beside the arrays so that a later
    run can use the file as cached reference statistics and check they fit.
    """
    import json

    path = Path(path)
    arrays: dict[str, np.ndarray] = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for name, s in stats.items():
        arrays.update({f"{name}/{f}": getattr(s, f) for f in _FIELDS
                       if getattr(s, f) is not None})
        arrays[f"{name}/sizes"] = s.sizes
        arrays[f"{name}/shape"] = np.array([s.n_items, s.n_q], np.int64)
        arrays[f"{name}/ids"] = np.frombuffer(json.dumps(s.ids).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        digest = sha256_file(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    from noencore.fileio import atomic_write

    # the checksum lands after the data: a crash in between leaves a file load_stats refuses
    atomic_write(path.parent / (path.name + ".sha256"), (digest + "\n").encode())
    return digest


def load_stats(path: str | os.PathLike) -> tuple[dict[str, SetStats], dict[str, Any]]:
    """Read a file written by :func:`save_stats`, checking its sha256 first."""
    import json

    path = Path(path)
    if path.is_dir():
        path = path / "token_stats.npz"
    side = path.parent / (path.name + ".sha256")
    if not path.is_file() or not side.is_file():
        raise NoencoreError(f"{path}: no cached token statistics (token_stats.npz and its .sha256); "
                            "give a folder written by `noencore evaluate` or a model")
    if sha256_file(path) != side.read_text().strip():
        raise NoencoreError(f"{path}: checksum mismatch (corrupt or half-written); rerun the "
                            "evaluation that wrote it")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(data.pop("meta").tobytes().decode())
    names = sorted({k.split("/")[0] for k in data})
    stats = {}
    for name in names:
        n_items, n_q = (int(v) for v in data[f"{name}/shape"])
        stats[name] = SetStats(**{f: data[f"{name}/{f}"] for f in _FIELDS if f != "position"},
                               n_items=n_items, n_q=n_q, sizes=data[f"{name}/sizes"],
                               ids=json.loads(data[f"{name}/ids"].tobytes().decode()),
                               # files written before positions were stored lack them
                               position=data.get(f"{name}/position"))
    return stats, meta


