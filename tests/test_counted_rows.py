"""The training step computes only what a loss reads: the heads get the counted positions
(``adapter.counted_positions``, found on the host) and the transformer runs only up to the
last frame a loss reads (``adapter.trim_frames``). Checked against plain loops on random
masks of awkward sizes, against the dense layout (every position a row) on whole runs in
one process, and on 2 ZeRO-3 ranks, where a rank's rows may all be padding and every
head must still get a gradient."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, random_items, run_two_ranks  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 2}}
# windows of 16 frames over items of 20-35 frames: most items end in a padded window;
# micro-batches of one row, as a large model's ranks run them
RUN = dict(forget="forget", method="graddiff", steps=4, lr=1e-3, batch_size=4, accumulation=4,
           forget_ratio=0.5, frames=16, seed=3, progress=False, backend="torch", save=False, log_every=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    root = tmp_path_factory.mktemp("counted")
    return root, conditioned_shards(root / "shards", random_items(3, 6, 20), OVERRIDES)


def _fresh():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)


def _random_keep(lm, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """``token_mask`` of rows of random lengths 0..T (padding at the end)."""
    from noencore.models.adapter import token_mask

    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, None, :] < lengths[:, None, None]
    return token_mask(lm, mask.expand(B, lm.num_codebooks, T).clone())


def test_counted_positions_are_the_counted_tokens():
    from noencore.models.adapter import counted_positions

    g = torch.Generator().manual_seed(0)
    for B, K, T in [(1, 4, 1), (3, 4, 13), (7, 3, 29), (2, 5, 101)]:
        keep = torch.rand(B, K, T, generator=g) < 0.6
        keep[:, 1] = False  # a codebook no loss reads
        index, sizes = counted_positions(keep)
        assert len(sizes) == K and index.dtype == torch.long and index.numel() == sum(sizes)
        for k, pos in enumerate(index.split(list(sizes))):
            want = [b * T + t for b in range(B) for t in range(T) if keep[b, k, t]]
            # a codebook with nothing counted keeps one (uncounted) row, so its head trains
            assert pos.tolist() == (want or [0])


def test_trim_frames_cuts_after_the_last_counted_frame():
    from noencore.models.adapter import CUT_LENGTHS, pattern_index, token_mask, trim_frames

    lm = _fresh().lm
    g = torch.Generator().manual_seed(1)
    for B, T in [(1, 9), (3, 17), (5, 40), (2, 250)]:
        step = -(-T // CUT_LENGTHS)
        for _ in range(4):
            keep = _random_keep(lm, B, T, g)
            n = trim_frames(lm, keep)
            frames = keep.any(dim=(0, 1)).nonzero()
            last = int(frames.max()) + 1 if frames.numel() else 1
            assert n == min(T, -(-last // step) * step)  # one of few lengths, >= last
            assert not keep[..., n:].any()
            # every counted token sits on the same step of the shorter sequence
            seq_n, valid_n = pattern_index(lm, n)
            seq_t, _ = pattern_index(lm, T)
            used = keep[:, :, :n].any(dim=0)
            assert valid_n[used].all() and (seq_n[used] == seq_t[:, :n][used]).all()
    full = torch.ones(2, lm.num_codebooks, 12, dtype=torch.bool)
    assert trim_frames(lm, token_mask(lm, full)) == 12
    assert trim_frames(lm, torch.zeros(2, lm.num_codebooks, 12, dtype=torch.bool)) == 1


def test_the_cut_batch_gives_the_counted_rows_the_same_states(data):
    """The heads' rows of a cut batch against the same rows of the whole batch: the
    transformer's states (with the text condition) and the targets, row for row."""
    from noencore.engine.objective import counted_layout
    from noencore.models.adapter import counted_positions, dense_codebook_rows
    from noencore.models.text import ConditionCache

    root, shards = data
    model = _fresh()
    lm = model.lm.eval()
    g = torch.Generator().manual_seed(2)
    B, T = 3, 37
    keep = _random_keep(lm, B, T, g)
    keep[:, :, 29:] = False  # every row ends by frame 29
    codes = torch.randint(0, model.card, (B, lm.num_codebooks, T), generator=g)
    emb, emask = ConditionCache(root / "shards" / "conditions").batch(shards.captions[:B])
    conds = model.condition_tensors(emb, emask)
    cut, keep_cut, positions, window = counted_layout(lm, codes, keep)
    assert cut.shape[-1] < T and window == T
    with torch.no_grad():
        got = dense_codebook_rows(lm, cut, keep_cut, conds, positions)
        want = dense_codebook_rows(lm, codes, keep, conds, counted_positions(keep))
    for (a, va), (b, vb) in zip(got, want):
        assert torch.equal(va, vb) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.item, b.item) and torch.equal(a.time, b.time)
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)


class _Spy:
    """Records what each training forward handed the heads and the transformer."""

    def __init__(self, monkeypatch):
        from noencore.engine import objective

        self.calls: list[dict] = []
        real = objective.dense_codebook_rows

        def spy(lm, codes, keep, conds, positions=None):
            parts = real(lm, codes, keep, conds, positions)
            self.calls.append({"frames": codes.shape[-1], "positions": positions,
                               "rows": [p.hidden.shape[0] for p, _ in parts],
                               "counted": [int(v.sum()) for _, v in parts],
                               "keep": keep.detach().cpu()})
            return parts

        monkeypatch.setattr(objective, "dense_codebook_rows", spy)


def _dense_layout(lm, codes, keep):
    """Every position a head row (the uncounted ones marked), no frame cut."""
    B, K, T = codes.shape
    return codes, keep, (torch.arange(B * T).repeat(K), (B * T,) * K), T


def _update(start: dict, state: dict) -> torch.Tensor:
    return torch.cat([(state[k] - start[k]).flatten().double() for k in start])


def test_the_training_step_reads_only_counted_rows_and_trains_as_the_dense_layout(
        data, monkeypatch):
    from noencore import unlearn
    from noencore.engine import loop

    _, shards = data
    start = _fresh().lm.state_dict()
    spy = _Spy(monkeypatch)
    got = unlearn(_fresh(), shards, **RUN, method_options={"remain_weight": 0.5})
    counted_calls = spy.calls
    spy.calls = []
    monkeypatch.setattr(loop, "counted_layout", _dense_layout)
    want = unlearn(_fresh(), shards, **RUN, method_options={"remain_weight": 0.5})
    dense_calls = spy.calls

    assert len(counted_calls) == len(dense_calls) == RUN["steps"] * RUN["accumulation"]
    for c in counted_calls:
        assert c["positions"] is not None
        # the heads computed exactly the counted rows (one uncounted row where none)
        assert c["rows"] == [max(1, n) for n in c["keep"].sum(dim=(0, 2)).tolist()]
        assert c["counted"] == c["keep"].sum(dim=(0, 2)).tolist()
        assert c["keep"][..., -1].any() or c["frames"] == 1  # cut after the last counted
    assert any(c["frames"] < RUN["frames"] for c in counted_calls), "no batch was cut"
    assert all(c["frames"] == RUN["frames"] and c["rows"] == [c["keep"][:, 0].numel()] * 4
               for c in dense_calls)
    assert sum(sum(c["rows"]) for c in counted_calls) < sum(sum(c["rows"]) for c in dense_calls)
    # the same step numbers, the same update (sums in another order: float32 rounding)
    assert len(got.metrics) == len(want.metrics) == RUN["steps"]
    for a, b in zip(got.metrics, want.metrics):
        assert a["tokens"] == b["tokens"]
        assert a["forget_nll"] == pytest.approx(b["forget_nll"], rel=1e-5)
        assert a["remain_nll"] == pytest.approx(b["remain_nll"], rel=1e-5)
    ours, ref = _update(start, got.model.lm.state_dict()), _update(start,
                                                                   want.model.lm.state_dict())
    cos = float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))
    assert cos > 0.9999 and abs(float(ours.norm() / ref.norm()) - 1) < 1e-3, cos


@pytest.mark.parametrize("method,options", [
    ("graddiff", {"remain_weight": 0.5}),
    ("npo", {"remain_anchor": True}),  # reads each row's reference NLL (by its unit)
    ("rl", {}),  # reads each row's global index (the random labels' hash)
], ids=["graddiff", "npo-anchored", "rl"])
def test_micro_batches_take_the_longest_windows_first_and_train_as_one_batch(
        data, monkeypatch, method, options):
    """With accumulation, a rank's rows of a step go into micro-batches longest first (so
    short windows share a micro-batch that is cut short); the update is the one of the whole
    step in one micro-batch, every position computed, for methods that read each row's
    reference and global index."""
    from noencore import unlearn
    from noencore.engine import loop

    _, shards = data
    run = dict(RUN, batch_size=6, accumulation=3, steps=3, method=method,
               method_options=options)
    start = _fresh().lm.state_dict()
    spy = _Spy(monkeypatch)
    got = unlearn(_fresh(), shards, **run)
    calls = spy.calls
    assert len(calls) == run["steps"] * run["accumulation"]

    def length(keep):  # per row: one past its last counted frame
        frame = torch.arange(1, keep.shape[-1] + 1)
        return (keep.any(dim=1) * frame).amax(dim=1).tolist()

    for s in range(run["steps"]):
        step = [length(c["keep"]) for c in calls[s * 3:(s + 1) * 3]]
        flat = [n for micro in step for n in micro]
        assert flat == sorted(flat, reverse=True), step
    assert any(c["frames"] < RUN["frames"] for c in calls)
    monkeypatch.setattr(loop, "counted_layout", _dense_layout)
    want = unlearn(_fresh(), shards, **dict(run, accumulation=1))
    ours, ref = _update(start, got.model.lm.state_dict()), _update(start,
                                                                   want.model.lm.state_dict())
    cos = float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))
    assert cos > 0.9999 and abs(float(ours.norm() / ref.norm()) - 1) < 1e-3, cos


def test_random_labels_do_not_depend_on_the_cut(data, monkeypatch):
    """RL's labels hash (row, frame) over the window's frames, not the cut batch's."""
    from noencore import unlearn
    from noencore.engine import loop

    _, shards = data
    run = dict(RUN, method="rl", steps=2)
    start = _fresh().lm.state_dict()
    got = unlearn(_fresh(), shards, **run)
    monkeypatch.setattr(loop, "counted_layout", _dense_layout)
    want = unlearn(_fresh(), shards, **run)
    ours, ref = _update(start, got.model.lm.state_dict()), _update(start,
                                                                   want.model.lm.state_dict())
    assert float(torch.nn.functional.cosine_similarity(ours, ref, dim=0)) > 0.9999


_DRIVER = """
import json, os, sys
import torch.multiprocessing as mp
PORT, SHARDS, OUT, RUN, OVERRIDES = sys.argv[1], sys.argv[2], sys.argv[3], {run}, {overrides}


def work(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    import torch
    from safetensors.torch import save_file
    from noencore.engine import Trainer, UnlearnConfig, objective
    from noencore.models import load_musicgen

    seen = []
    real = objective.dense_codebook_rows

    def spy(lm, codes, keep, conds, positions=None):
        parts = real(lm, codes, keep, conds, positions)
        seen.append({{"frames": codes.shape[-1], "device": str(positions[0].device),
                      "rows": [p.hidden.shape[0] for p, _ in parts],
                      "counted": keep.sum(dim=(0, 2)).tolist()}})
        return parts

    objective.dense_codebook_rows = spy
    model = load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)
    cfg = UnlearnConfig().replace(**RUN, zero_stage=3, device="cpu")
    Trainer(model, SHARDS, cfg, progress=False).run()
    state = {{k: v.contiguous() for k, v in model.lm.state_dict().items()}}
    save_file(state, f"{{OUT}}/rank{{rank}}.safetensors")
    with open(f"{{OUT}}/rank{{rank}}.json", "w") as fh:
        json.dump(seen, fh)
    if rank == 0:
        open(f"{{OUT}}/DONE", "w").write("ok")

if __name__ == "__main__":
    mp.spawn(work, nprocs=2, join=True)
"""


@pytest.mark.distributed
def test_two_zero3_ranks_with_counted_rows_train_as_one_dense_process(data, tmp_path,
                                                                       monkeypatch):
    """2 gloo ranks under ZeRO-3 (bf16), one row per rank and step: each rank cuts and
    counts its own rows (a different length on each rank), the positions are on the rank's
    device, every head gets a gradient (ZeRO-3 hangs or fails otherwise), and the weights
    move as one fp32 process with the dense layout moves them."""
    from safetensors.torch import load_file

    from noencore import unlearn
    from noencore.engine import loop

    _, shards = data
    run = dict(RUN, batch_size=2, accumulation=1, lr=1e-2, steps=3)
    start = _fresh().lm.state_dict()
    monkeypatch.setattr(loop, "counted_layout", _dense_layout)
    ref = _update(start, unlearn(_fresh(), shards, **run).model.lm.state_dict())
    ranks_run = {k: v for k, v in run.items() if k != "progress"}
    run_two_ranks(_DRIVER.format(run=ranks_run, overrides=OVERRIDES),
                  [str(shards.path), str(tmp_path)], tmp_path, timeout=900)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for calls in seen:
        assert len(calls) == run["steps"]
        for c in calls:
            assert c["device"] == "cpu"
            assert c["rows"] == [max(1, n) for n in c["counted"]]
    assert any(c["frames"] < run["frames"] for calls in seen for c in calls)
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        ours = _update(start, got)
        cos = float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))
        ratio = float(ours.norm() / ref.norm())
        print(f"rank {rank}: cosine {cos:.4f}, norm ratio {ratio:.3f}")
        assert cos > 0.97 and abs(ratio - 1) < 0.1, (rank, cos, ratio)


def test_the_compiled_block_compiles_no_graph_for_cut_batches(data, monkeypatch):
    """--compile: the block's graphs are made in the warm-up (sequence length dynamic), and
    micro-batches cut to other lengths reuse them: no compile inside the steps."""
    from torch._dynamo.utils import counters

    from noencore import unlearn
    from noencore.models import block

    _, shards = data
    monkeypatch.setenv("NOENCORE_COMPILE_BACKEND", "aot_eager")  # dynamo's guards, fast
    after = {}
    real = block.FusedBlocks.warm_up

    def warm_up(self, x, cross, **kw):
        real(self, x, cross, **kw)
        after["graphs"] = int(counters["stats"]["unique_graphs"])

    monkeypatch.setattr(block.FusedBlocks, "warm_up", warm_up)
    spy = _Spy(monkeypatch)
    res = unlearn(_fresh(), shards, **dict(RUN, steps=3), compile=True)
    assert res.compile["compiled"] and res.compile["backend"] == "aot_eager"
    assert len({c["frames"] for c in spy.calls}) > 1, "no micro-batch was cut"
    assert int(counters["stats"]["unique_graphs"]) == after["graphs"], \
        "a graph was compiled during the steps"
