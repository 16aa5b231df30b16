"""The training step never waits for the device: no value is read back to the host
between the moment a step's inputs are on the device and the optimizer update.

A CPU run cannot feel a host-device synchronisation, so the test looks for the Python
operations that cause one on a GPU (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
``.numpy()``, ``nonzero``, boolean-mask indexing, ...) while the device part of real
training steps runs, for a method of each family (weights before the op, weights after
it, random labels), in fp32 and under bf16 autocast. The reads the loop does on purpose
(once per logging interval) happen outside that part.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, random_items  # noqa: E402

READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy",
         "nonzero", "unique", "masked_select", "argwhere", "__len__"}
# where a read is allowed, because it reads a CPU tensor on a GPU run too: the op
# validates targets on the host only when they live there (``first_bad_target``; on CUDA a
# bad target gives its row NaN instead), and torch's Adam keeps its step count on the CPU
CPU_ONLY = {"ops/linear_ce.py:first_bad_target", "optim/optimizer.py:_get_value"}


class CountReads(TorchFunctionMode):
    """Records every tensor operation that reads a value back to the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        tensor_repeats = name == "repeat_interleave" and isinstance(
            kwargs.get("repeats", args[1] if len(args) > 1 else None), torch.Tensor)
        if name in READS or boolean_index or tensor_repeats:
            where = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}"
                     for f in traceback.extract_stack()[:-1]]
            if not CPU_ONLY.intersection(where):
                self.reads.append(f"{name} at {' <- '.join(reversed(where[-4:]))}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    return conditioned_shards(tmp_path_factory.mktemp("syncs") / "shards",
                              random_items(3, 6, 20))


@pytest.mark.parametrize("method,opts,precision", [
    ("graddiff", {}, "fp32"), ("rl", {"remain_weight": 0.5}, "fp32"),
    ("npo", {"beta": 0.5, "remain_anchor": True}, "bf16"),
    ("bounded_ga", {"loss_cap": 8.0, "row_target": 9.0}, "fp32")])
def test_device_part_of_the_step_reads_nothing_back(data, monkeypatch, method, opts,
                                                    precision):
    from noencore import unlearn
    from noencore.engine import loop
    from noencore.models import load_musicgen

    counter, steps = CountReads(), []
    real = loop._device_step

    def counted(run, micro):
        with counter:
            out = real(run, micro)
        steps.append(out)
        return out

    monkeypatch.setattr(loop, "_device_step", counted)
    model = load_musicgen("tiny", with_codec=False, overrides={"transformer_lm": {"num_layers": 1}})
    res = unlearn(model, data, forget="forget", method=method, method_options=opts, steps=3,
                  lr=1e-3, batch_size=6, frames=12, accumulation=2, precision=precision,
                  progress=False, save=False, backend="auto", log_every=3)
    assert len(steps) == 3 and res.steps == 3 and res.metrics[-1]["forget_nll"] > 0
    assert not counter.reads, "\n".join(counter.reads[:10])


def test_the_counter_sees_a_read(data):
    """The check itself: a read of each kind inside the counted block is recorded."""
    counter = CountReads()
    t = torch.arange(4.0)
    with counter:
        float(t.sum())
        bool(t.any())
        t[t > 1].sum()
        t.nonzero()
    assert [r.split()[0] for r in counter.reads] == ["__float__", "__bool__", "__getitem__",
                                                    "nonzero"]
