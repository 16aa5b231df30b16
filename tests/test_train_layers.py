"""``train_layers``: only the selected transformer blocks, the output norm and the heads
train; everything else stays bit for bit, holds no gradient and no optimizer state;
backward stops at the lowest trained block (with activation checkpointing too); the option
is checked in one line, a resume must select the same blocks, and two ZeRO-2/3 ranks train
the selected blocks as one process does while the frozen weights come back unchanged."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from noencore.errors import UsageError

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_shards import conditioned_shards, random_items, run_two_ranks  # noqa: E402

OVERRIDES = {"transformer_lm": {"num_layers": 3}}
RUN = dict(forget="forget", method="graddiff", steps=3, lr=1e-3, batch_size=4,
           forget_ratio=0.5, frames=12, seed=5, progress=False, backend="torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    os.environ.setdefault("NOENCORE_CACHE", str(tmp_path_factory.mktemp("nc_cache")))
    root = tmp_path_factory.mktemp("train_layers")
    return root, conditioned_shards(root / "shards", random_items(2, 6, 20), OVERRIDES)


def _fresh():
    from noencore.models import load_musicgen

    return load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)


def _trained_names(lm: torch.nn.Module, blocks: tuple[int, ...]) -> set[str]:
    return {n for n, _ in lm.named_parameters()
            if n.startswith(("out_norm.", "linears."))
            or any(n.startswith(f"transformer.layers.{b}.") for b in blocks)}


def _spy_adamw(monkeypatch) -> list[dict]:
    """Each AdamW step's view of the LM: which parameters hold a gradient, and the
    optimizer's state entries and their bytes (after the step)."""
    seen: list[dict] = []
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        seen.append({"params": [p for g in self.param_groups for p in g["params"]],
                     "state": len(self.state),
                     "bytes": sum(t.numel() * t.element_size() for s in self.state.values()
                                  for t in s.values() if t.dim() > 0)})
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return seen


@pytest.mark.parametrize("choice,blocks", [("top:1", (2,)), ("1", (1,)), ([0, 2], (0, 2))])
def test_only_the_selected_blocks_norm_and_heads_change(data, monkeypatch, choice, blocks):
    from noencore import unlearn

    _, shards = data
    model = _fresh()
    start = {n: p.detach().clone() for n, p in model.lm.named_parameters()}
    trained = _trained_names(model.lm, blocks)
    grads: list[dict[str, bool]] = []
    real = torch.nn.utils.clip_grad_norm_

    def clip(params, *a, **k):  # just before each update: who holds a gradient
        grads.append({n: p.grad is not None for n, p in model.lm.named_parameters()})
        return real(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    res = unlearn(model, shards, **RUN, train_layers=choice, save=False)
    assert res.steps == 3 and len(grads) == 3
    for held in grads:
        assert {n for n, has in held.items() if has} == trained
    for n, p in res.model.lm.named_parameters():
        if n in trained:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, start[n]), n
        assert p.requires_grad  # the returned model is trainable again, as before the run
    assert any(n.startswith("emb.") for n in start) and not trained & {
        n for n in start if n.startswith(("emb.", "condition_provider."))}


def test_optimizer_state_holds_only_the_trained_parameters(data, monkeypatch):
    from noencore import unlearn

    _, shards = data
    seen = _spy_adamw(monkeypatch)
    model = _fresh()
    unlearn(model, shards, **{**RUN, "steps": 1}, train_layers="top:1", save=False)
    trained = _trained_names(model.lm, (2,))
    numel = sum(p.numel() for n, p in model.lm.named_parameters() if n in trained)
    full = sum(p.numel() for p in model.lm.parameters())
    assert seen[0]["state"] == len(trained) == len(seen[0]["params"])
    assert seen[0]["bytes"] == 2 * 4 * numel  # fp32 exp_avg and exp_avg_sq
    assert numel < full / 2  # the embeddings dominate this tiny model
    unlearn(_fresh(), shards, **{**RUN, "steps": 1}, save=False)
    assert seen[1]["state"] == len(list(model.lm.parameters()))
    assert seen[1]["bytes"] == 2 * 4 * full


def test_all_blocks_equal_a_full_run(data):
    """"all" is the full run bit for bit; every block selected, the trained tensors take
    the full run's first step (AdamW is element-wise; no clipping across the sets)."""
    from noencore import unlearn

    _, shards = data
    full = unlearn(_fresh(), shards, **RUN, save=False).model.lm.state_dict()
    every = unlearn(_fresh(), shards, **RUN, train_layers="all", save=False).model.lm
    assert all(torch.equal(v, full[k]) for k, v in every.state_dict().items())
    one = dict(RUN, steps=1, grad_clip=None, save=False)
    start = _fresh().lm.state_dict()
    full = unlearn(_fresh(), shards, **one).model.lm.state_dict()
    blocks = unlearn(_fresh(), shards, **one, train_layers="0,1,2").model.lm.state_dict()
    trained = _trained_names(_fresh().lm, (0, 1, 2))
    for k, v in blocks.items():
        if k in trained:
            assert not torch.equal(v, start[k])
            torch.testing.assert_close(v, full[k], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(v, start[k]), k


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("blocks", [(2,), (1,)])
def test_backward_stops_at_the_lowest_trained_block(data, checkpointing, blocks):
    from noencore.engine.objective import UnlearnObjective, token_counts
    from noencore.methods import get_method
    from noencore.models.adapter import token_mask
    from noencore.models.text import ConditionCache
    from noencore.models.train_layers import freeze_outside

    root, shards = data
    model = _fresh()
    freeze_outside(model.lm, blocks)
    model.activation_checkpointing(checkpointing)
    seen: dict[int, tuple[bool, bool]] = {}

    def record(i: int):  # whether a layer's input and output require gradients
        def hook(mod, args, out) -> None:
            seen.setdefault(i, (args[0].requires_grad, out.requires_grad))
        return hook
    for i, layer in enumerate(model.lm.transformer.layers):
        layer.register_forward_hook(record(i))
    B, K, T = 2, model.n_q, 12
    codes = torch.randint(0, model.card, (B, K, T), generator=torch.Generator().manual_seed(0))
    mask = token_mask(model.lm, torch.ones(B, K, T, dtype=torch.bool))
    forget = torch.tensor([True, False])
    emb, emask = ConditionCache(root / "shards" / "conditions").batch(shards.captions[:2])
    obj = UnlearnObjective(model, get_method("graddiff"), backend="torch")
    loss, _ = obj(codes, mask, forget, emb, emask, None, token_counts(model.lm, mask, forget),
                  7, torch.tensor([0, 1]))
    low = min(blocks)
    assert sorted(seen) == [0, 1, 2]
    for i, (grad_in, grad_out) in seen.items():  # no activation gradient below ``low``
        assert grad_in is (i > low) and grad_out is (i >= low), (i, grad_in, grad_out)
    reached, stack, nodes = set(), [loss.grad_fn], 0
    while stack:  # the backward graph: which parameters it reaches
        fn = stack.pop()
        nodes += 1
        if hasattr(fn, "variable"):
            reached.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    names = {id(p): n for n, p in model.lm.named_parameters()}
    assert {names[i] for i in reached} == _trained_names(model.lm, blocks)
    loss.backward()
    for n, p in model.lm.named_parameters():
        assert (p.grad is not None) is p.requires_grad, n


@pytest.mark.parametrize("value", ["top:0", "top:", "x", "1,,2", "-1", [], [1, -2], [True],
                                   "top:2,3"])
def test_a_malformed_value_is_one_line_naming_the_option(value):
    from noencore.engine.config import UnlearnConfig

    with pytest.raises(UsageError) as err:
        UnlearnConfig(train_layers=value).check()
    text = str(err.value)
    assert "\n" not in text and text.startswith("option train_layers (--train-layers): ")
    assert "top:N" in text


@pytest.mark.parametrize("value,match", [
    ("top:4", r"asks for 4 blocks; the model has 3 \(use top:1 to top:3\)"),
    ("1,3,7", r"block\(s\) \[3, 7\] do not exist; the model has 3 blocks, numbered 0 to 2")])
def test_blocks_the_model_lacks_are_named_with_its_layer_count(data, value, match):
    from noencore import unlearn

    _, shards = data
    with pytest.raises(UsageError, match="option train_layers \\(--train-layers\\): .*" + match):
        unlearn(_fresh(), shards, **RUN, train_layers=value)


def test_the_flag_and_config_key(data, tmp_path, capsys):
    from noencore.cli import main

    _, shards = data
    base = ["unlearn", "--model", "tiny", "--shards", str(shards.path), "--forget", "forget",
            "--method", "ga", "--steps", "1", "--batch-size", "4", "--frames", "12", "--quiet"]
    assert main(base + ["--train-layers", "top:9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train_layers (--train-layers)" in err and "has 2" in err
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train_layers": [1], "out": str(tmp_path / "run")}))
    assert main(base + ["--config", str(cfg)]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train_layers"] == [1]
    assert main(base + ["--train-layers", "top:1", "--lora-rank", "2"]) == 2
    assert "give one" in capsys.readouterr().err


def test_resume_needs_the_same_blocks(data, tmp_path):
    from noencore import unlearn

    _, shards = data
    run = dict(RUN, steps=2, out=tmp_path / "run", checkpoint_every=1)
    unlearn(_fresh(), shards, **run, train_layers="top:1")
    with pytest.raises(UsageError, match=r"train_layers=\[2\] \(this run: \[1, 2\]\)"):
        unlearn(_fresh(), shards, **{**run, "steps": 3}, resume=True, train_layers="top:2")
    with pytest.raises(UsageError, match=r"train_layers=\[2\] \(this run: None\)"):
        unlearn(_fresh(), shards, **{**run, "steps": 3}, resume=True)
    # the same blocks, written another way: the run goes on
    res = unlearn(_fresh(), shards, **{**run, "steps": 3}, resume=True, train_layers=[2])
    assert res.steps == 3 and [m["step"] for m in res.metrics] == [1, 2, 3]


_DRIVER = """
import json, os, sys
import torch.multiprocessing as mp
PORT, SHARDS, OUT, RUN, OVERRIDES = sys.argv[1], sys.argv[2], sys.argv[3], {run}, {overrides}


def work(rank):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=PORT)
    from safetensors.torch import save_file
    from noencore.engine import Trainer, UnlearnConfig
    from noencore.engine.zero import MasterWeights
    from noencore.models import load_musicgen

    run = {{k: v for k, v in RUN.items() if k != "progress"}}
    for stage in (2, 3):
        model = load_musicgen("tiny", with_codec=False, overrides=OVERRIDES)
        cfg = UnlearnConfig().replace(**run, train_layers="top:1", zero_stage=stage,
                                      device="cpu", save=False, checkpointing=True)
        trainer = Trainer(model, SHARDS, cfg, progress=False)
        trainer.run()
        state = {{k: v.contiguous() for k, v in model.lm.state_dict().items()}}
        save_file(state, f"{{OUT}}/z{{stage}}_rank{{rank}}.safetensors")
        owned = sum(t.numel() for t in MasterWeights(trainer.engine)._flat)
        with open(f"{{OUT}}/z{{stage}}_rank{{rank}}_partition.json", "w") as fh:
            json.dump(owned, fh)  # this rank's fp32 master elements in ZeRO's partition
    if rank == 0:
        open(f"{{OUT}}/DONE", "w").write("ok")

if __name__ == "__main__":
    mp.spawn(work, nprocs=2, join=True)
"""


@pytest.mark.distributed
def test_two_zero_ranks_train_the_blocks_as_one_process(data, tmp_path):
    """ZeRO-2 and ZeRO-3 (bf16) on 2 gloo ranks: the frozen weights come back bit for bit on
    every rank (not bf16-rounded), the trained ones move as in one fp32 process (the
    tolerance of the LoRA test: bf16 weights and gradients under DeepSpeed)."""
    from safetensors.torch import load_file

    from noencore import unlearn

    _, shards = data
    run = dict(RUN, lr=1e-2)
    start = _fresh().lm.state_dict()
    want = unlearn(_fresh(), shards, **run, train_layers="top:1", save=False).model.lm
    want = want.state_dict()
    trained = sorted(_trained_names(_fresh().lm, (2,)))
    moved = torch.cat([(want[k] - start[k]).flatten() for k in trained])
    run_two_ranks(_DRIVER.format(run=run, overrides=OVERRIDES),
                  [str(shards.path), str(tmp_path)], tmp_path)
    numel = {n: p.numel() for n, p in _fresh().lm.named_parameters()}
    for stage in (2, 3):
        for rank in (0, 1):  # ZeRO's fp32 partitions: half the trained parameters each
            owned = json.loads((tmp_path / f"z{stage}_rank{rank}_partition.json").read_text())
            assert abs(owned - sum(numel[k] for k in trained) / 2) <= 64, (stage, owned)
            got = load_file(tmp_path / f"z{stage}_rank{rank}.safetensors")
            assert got.keys() == start.keys()
            for k in start:
                if k not in trained:
                    assert torch.equal(got[k], start[k]), (stage, rank, k)
            ours = torch.cat([(got[k] - start[k]).flatten() for k in trained])
            cos = float(torch.nn.functional.cosine_similarity(ours, moved, dim=0))
            ratio = float(ours.norm() / moved.norm())
            print(f"stage {stage} rank {rank}: cosine {cos:.4f}, norm ratio {ratio:.3f}")
            assert cos > 0.97 and abs(ratio - 1) < 0.1, (stage, rank, cos, ratio)
