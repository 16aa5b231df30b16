"""The memory planner: parameter counts against audiocraft, ZeRO accounting, activations
against what autograd saves and a measured step, the recommendation, the tables and the CLI."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from noencore.cli import main
from noencore.planner import (
    ARCHITECTURES,
    CPP_CHUNK_BYTES,
    GIB,
    OP_CHUNK_ROWS,
    MusicGenArch,
    PlanRow,
    ZeroLimits,
    accumulation_choices,
    format_plan_table,
    format_recommendations,
    get_arch,
    loss_bytes,
    lowest_fitting,
    max_micro_batch,
    parse_memory,
    plan_memory,
    recommend,
    saved_activation_bytes,
    split_batch,
    step_memory,
    zero_limits,
)


@pytest.fixture(scope="module")
def audiocraft_lm():
    """Builds audiocraft's LMModel the way MusicGen configures it (T5 and chroma
    conditioners replaced by their trainable output projection, which is all they add)."""
    lm_mod = pytest.importorskip("audiocraft.models.lm")
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider
    from audiocraft.modules.conditioners import (
        BaseConditioner,
        ConditionFuser,
        ConditioningProvider,
    )

    def build(arch: MusicGenArch, device: str = "meta") -> torch.nn.Module:
        with torch.device(device):
            conditioners = {"description": BaseConditioner(arch.text_dim, arch.dim)}
            if arch.n_chroma:
                conditioners["self_wav"] = BaseConditioner(arch.n_chroma, arch.dim)
            # Every fusing method named, as audiocraft's configs (and the engine's adapter) have them.
            fuser = ConditionFuser({"cross": ["description"], "prepend": []} if arch.cross_attention
                                   else {"cross": [], "prepend": sorted(conditioners)})
            return lm_mod.LMModel(
                pattern_provider=DelayedPatternProvider(arch.n_q, list(arch.delays)),
                condition_provider=ConditioningProvider(conditioners), fuser=fuser,
                n_q=arch.n_q, card=arch.card, dim=arch.dim, num_heads=arch.num_heads,
                num_layers=arch.num_layers, hidden_scale=arch.hidden_scale, norm="layer_norm",
                norm_first=True, bias_proj=arch.bias_proj, bias_ff=arch.bias_ff, bias_attn=arch.bias_attn,
                layer_scale=1e-4 if arch.layer_scale else None,
                cross_attention=arch.cross_attention, memory_efficient=True, causal=True,
                activation="gelu", dropout=0.0,
            )

    return build


VARIANTS = {
    "biases+layer_scale": MusicGenArch("v1", dim=96, num_layers=3, num_heads=4, bias_attn=True, bias_ff=True,
                                       bias_proj=True, layer_scale=True, text_dim=512, hidden_scale=3),
    "melody+biases": MusicGenArch("v2", dim=96, num_layers=2, num_heads=4, cross_attention=False, n_chroma=12,
                                  chroma_hop=4096, bias_attn=True, layer_scale=True, n_q=8,
                                  delays=(0, 0, 1, 1, 2, 2, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES) + sorted(VARIANTS))
def test_param_count_matches_audiocraft_lm(name: str, audiocraft_lm) -> None:
    arch = ARCHITECTURES.get(name) or VARIANTS[name]
    lm = audiocraft_lm(arch)  # meta device: shapes only, nothing allocated
    assert next(lm.parameters()).is_meta
    counted = {
        "heads": sum(p.numel() for p in lm.linears.parameters()),
        "embeddings": sum(p.numel() for p in lm.emb.parameters()),
        "transformer": sum(p.numel() for p in lm.transformer.parameters()),
    }
    breakdown = arch.param_breakdown()
    assert {k: breakdown[k] for k in counted} == counted
    assert arch.n_params() == sum(p.numel() for p in lm.parameters())


def test_known_sizes() -> None:
    # The paper's labels (300M, 1.5B, 3.3B) are loose; the exact counts are checked against
    # audiocraft above. Here: the known figures of the full LMs (with cross-attention).
    assert get_arch("small").n_params() == 420_371_456
    assert 1.8e9 < get_arch("medium").n_params() < 1.9e9
    assert 1.3e9 < get_arch("melody").n_params() < 1.5e9  # no cross-attention
    assert 3.1e9 < get_arch("facebook/musicgen-large").n_params() < 3.4e9
    assert get_arch("stereo-large").n_params() > get_arch("large").n_params()
    with pytest.raises(ValueError, match="unknown MusicGen model 'huge'"):
        get_arch("huge")


@pytest.mark.parametrize("name", ["small", "stereo-small"])
@pytest.mark.parametrize("seconds", [1.0, 7.3, 30.0])
def test_sequence_length_matches_the_delay_pattern(name: str, seconds: float) -> None:
    from audiocraft.modules.codebooks_patterns import DelayedPatternProvider

    arch = get_arch(name)
    frames = math.ceil(50 * seconds)
    pattern = DelayedPatternProvider(arch.n_q, list(arch.delays)).get_pattern(frames)
    # the valid steps only, as audiocraft's training and the engine's adapter build it
    seq, _, _ = pattern.build_pattern_sequence(torch.zeros(1, arch.n_q, frames, dtype=torch.long), arch.card,
                                               keep_only_valid_steps=True)
    assert arch.sequence_length(seconds, text_tokens=17) == seq.shape[-1]


def test_melody_prepends_chroma_frames_and_text() -> None:
    from audiocraft.modules.chroma import ChromaExtractor

    arch = get_arch("melody")
    chroma = ChromaExtractor(sample_rate=32000, n_chroma=12, radix2_exp=14, argmax=True)
    seconds = 3.5
    frames = chroma(torch.zeros(1, 1, int(seconds * 32000))).shape[1]
    audio_steps = get_arch("medium").sequence_length(seconds, text_tokens=20)
    assert arch.sequence_length(seconds, text_tokens=20) == audio_steps + frames + 20


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("gpus", [1, 3, 8])
def test_zero_accounting_known_answers(name: str, gpus: int) -> None:
    arch = get_arch(name)
    psi = arch.n_params()
    shard = math.ceil(psi / gpus)
    rows = {r.stage: r for r in plan_memory(name, gpus=gpus, micro_batch=2, seconds=5)}
    # stage 0 in bf16: DeepSpeed's optimizer accumulates gradients in an fp32 buffer as well
    assert (rows[0].params, rows[0].grads, rows[0].optim) == (2 * psi, 6 * psi, 12 * psi)
    assert (rows[1].params, rows[1].grads, rows[1].optim) == (2 * psi, 2 * psi, 12 * shard)
    assert (rows[2].params, rows[2].grads, rows[2].optim) == (2 * psi, 2 * shard, 12 * shard)
    assert (rows[3].params, rows[3].grads, rows[3].optim) == (2 * shard, 2 * shard, 12 * shard)
    states = [r.params + r.grads + r.optim for r in rows.values()]
    assert states == sorted(states, reverse=True)
    if gpus > 1:  # stages 0-2 partition more at each stage; ZeRO-3 never needs more than ZeRO-0
        totals = [r.total for r in rows.values()]
        assert totals[:3] == sorted(totals[:3], reverse=True) and totals[0] > totals[3]
    # One micro-batch's own memory does not depend on the stage (ZeRO-3 adds its gathers).
    step = step_memory(name, 2, 5)
    assert {r.moments["forward"] - r.moments["between"] for r in list(rows.values())[:3]} == {step.forward_peak}
    for r in rows.values():  # the columns describe the largest moment
        assert r.total == r.moments[r.peak] == max(r.moments.values())
    fp32 = plan_memory(name, gpus=gpus, precision="fp32", stages=(0, 3))
    assert (fp32[0].params, fp32[0].grads, fp32[0].optim) == (4 * psi, 4 * psi, 8 * psi)
    assert fp32[1].params == 4 * shard



def test_stop_rule_copy() -> None:
    # The stop rule keeps this rank's fp32 master weights: all of them at stage 0, its
    # partition at stages 1-3.
    psi = get_arch("medium").n_params()
    base = plan_memory("medium", gpus=4)
    stop = plan_memory("medium", gpus=4, stop_rule=True)
    extra = [r.other - b.other for r, b in zip(stop, base)]
    assert extra == [4 * psi] + [4 * math.ceil(psi / 4)] * 3
    assert [r.total - b.total for r, b in zip(stop, base)] == extra


def test_optimizer_offload() -> None:
    psi = get_arch("large").n_params()
    shard = math.ceil(psi / 4)
    rows = plan_memory("large", gpus=4, offload_optimizer=True)
    assert rows[0].optim == 12 * psi and not rows[0].offload_optimizer and rows[0].notes
    for r in rows[1:]:  # states, the fp32 gradient partition, the CPU update's two temporaries
        assert r.optim == 0 and r.offload_optimizer and r.cpu == (12 + 4 + 8) * shard
        assert r.moments["update"] == r.moments["between"]  # the GPU holds nothing more for it
    assert [r.grads for r in rows] == [6 * psi, 2 * psi, 0, 0]
    assert "optimizer offload needs ZeRO >= 1" in format_plan_table(rows)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_agree_with_deepspeed_estimators(gpus: int) -> None:
    """DeepSpeed's own estimators agree: at stage 2, 2 bytes of weights per parameter plus 18
    per owned one (bf16 and fp32 gradients, fp32 master, m, v). At stage 3 (where 4 bytes
    per parameter of the largest layer is the gathered working set, as here) its estimator
    leaves out the bf16 gradient partition, which the planner keeps (exactly 2 bytes per
    owned parameter more), and the K heads the fused op reads as external parameters."""
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = get_arch("large")
    psi, largest = arch.n_params(), arch.layer_params()
    for offload in (False, True):
        rows = plan_memory(arch, gpus=gpus, fp32_grads=True, offload_optimizer=offload)
        states = [r.params + r.grads + r.optim for r in rows]
        ds2 = zero2.estimate_zero2_model_states_mem_needs(psi, gpus, 1, cpu_offload=offload)[1]
        assert abs(states[2] - ds2) <= 18 * gpus  # DeepSpeed rounds the partition down
        ds3 = estimate_zero3_model_states_mem_needs(psi, largest, gpus, 1, cpu_offload=offload,
                                                    cpu_offload_params=False)[1]
        bf16_grad_part = 0 if offload else 2 * math.ceil(psi / gpus)
        two_layers = 2 * 2 * largest  # the estimator's gathered working set, without the heads
        assert abs(states[3] + two_layers - bf16_grad_part - ds3) <= 18 * gpus
    plain = plan_memory(arch, gpus=gpus)
    fp32 = plan_memory(arch, gpus=gpus, fp32_grads=True)
    # counted resident through the step instead of at the update (stage 0 holds it anyway)
    assert [f.grads - p.grads for f, p in zip(fp32, plain)] == [0] + [4 * math.ceil(psi / gpus)] * 3
    # the update holds the same either way, but where ZeRO-3 updates sub-groups of 1e9 at a time
    shard = math.ceil(psi / gpus)
    expect = [0, 0, 0, 4 * (min(shard, 10**9) - shard)]
    assert [p.moments["update"] - f.moments["update"] for f, p in zip(fp32, plain)] == expect


def test_reduction_buckets() -> None:
    """Stages 1-3 hold DeepSpeed's 5e8-element reduce bucket through the backward; stage 0
    reduces after it, so its bucket only counts where it outgrows the freed activations."""
    bucket = 2 * 500_000_000
    rows = plan_memory("large", gpus=8, micro_batch=8)
    assert [r.moments["between"] - b.moments["between"] for r, b in zip(rows, rows[:1] * 4)][1:] != [0] * 3
    assert [r.buckets for r in rows[:3]] == [0, bucket, bucket]
    psi = get_arch("small").n_params()  # < 5e8: its stage-0 bucket holds all gradients
    tiny = plan_memory("small", gpus=2, micro_batch=1, seconds=0.1, checkpointing=True, stages=(0, 1),
                       fp32_grads=True)
    assert [r.moments["boundary"] - r.moments["between"] for r in tiny] == [2 * psi, 2 * math.ceil(psi / 2)]
    # On a CPU rank only the written part of the bucket is resident: every gradient, 2 psi.
    cpu = plan_memory("small", gpus=2, device="cpu", stages=(1, 2))
    gpu = plan_memory("small", gpus=2, stages=(1, 2))
    assert [r.moments["between"] - g.moments["between"] for r, g in zip(cpu, gpu)] == [2 * psi - bucket] * 2


def test_zero3_keeps_the_model_gathered() -> None:
    """ZeRO-3 keeps gathered weights it will reuse until stage3_max_live_parameters (1e9) are
    live: all of MusicGen-small (0.42 B) and medium (1.5 B: capped at 1e9) through the forward
    and the backward, not just two layers and the heads; a smaller limit in the DeepSpeed
    config lowers it, never below the layer in use, the one prefetched and the heads."""
    for name, gathered in (("small", get_arch("small").n_params()), ("medium", 10**9)):
        arch = get_arch(name)
        row = plan_memory(name, gpus=8, micro_batch=1, seconds=10, stages=(3,))[0]
        step = step_memory(name, 1, 10)
        assert row.moments["forward"] - row.moments["between"] == step.forward_peak + 2 * gathered
        copy = 2 * min(arch.n_params(), 500_000_000)  # the reduction's flat copy of its bucket
        assert row.moments["backward"] - row.moments["between"] == step.backward_peak + 2 * gathered + copy
        if row.peak == "backward":
            assert row.other == int(2 * GIB) + 2 * gathered and row.buckets == 2 * 500_000_000 + copy
    arch = get_arch("medium")
    floor = 2 * arch.layer_params() + arch.n_q * arch.card * arch.dim
    for live, expect in ((10**8, 10**8), (0, floor)):
        cfg = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": live}}
        row = plan_memory(arch, gpus=8, stages=(3,), zero_config=cfg)[0]
        assert row.moments["forward"] - row.moments["between"] == step_memory(arch, 1, 30).forward_peak + 2 * expect
    for stage in (0, 1, 2):  # the other stages keep every weight: nothing gathered
        row = plan_memory("medium", gpus=8, stages=(stage,))[0]
        assert row.moments["forward"] - row.moments["between"] == step_memory("medium", 1, 30).forward_peak


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_update_holds_fp32_gradients_and_adamw_temporaries(device: str) -> None:
    """The optimizer update: DeepSpeed's fp32 gradient partition (4 B per owned parameter,
    stages 1-3; stage 0 keeps its fp32 buffer all step) and torch AdamW's temporaries, one
    fp32 tensor in the multi-tensor update on CUDA, two in the single-tensor update on CPU.
    Without checkpointing the forward stays the peak; with it and few windows the update is."""
    psi = get_arch("large").n_params()
    shard = math.ceil(psi / 8)
    temps = {"cuda": 4, "cpu": 8}[device]
    rows = plan_memory("large", gpus=8, checkpointing=True, device=device)
    assert [r.moments["update"] - r.moments["between"] for r in rows] == [temps * psi] + [(4 + temps) * shard] * 3
    # at stages 1-2 the update is the peak, and its column shows it (the activations are freed)
    assert all(r.peak == "update" and r.update == (4 + temps) * shard and r.activations == 0 for r in rows[1:3])
    assert rows[2].total == sum((rows[2].params, rows[2].grads, rows[2].optim, rows[2].buckets, rows[2].update,
                                 rows[2].other))
    # ZeRO-3 updates its partition one sub-group at a time
    small_groups = plan_memory("large", gpus=8, stages=(3,), device=device,
                               zero_config={"zero_optimization": {"sub_group_size": 10**8}})[0]
    assert small_groups.moments["update"] - small_groups.moments["between"] == (4 + temps) * 10**8
    plain = plan_memory("large", gpus=8, micro_batch=8, stages=(1,))[0]
    assert plain.peak == "forward" and plain.update == 0


def test_rehearsal_memory_per_moment() -> None:
    """benchmarks/scale_check.py's rehearsal (MusicGen-small, ZeRO-3 bf16, 2 CPU ranks,
    micro-batch 1 x 2, checkpointing, the stop rule, the C++ op, 72 text tokens) measured
    these GiB per rank at each moment of a step (benchmarks/RESULTS.md, "scale"); the
    planner for a CPU rank without a CUDA reserve is within 3 % of each, and the step's
    peak is the update's."""
    measured = {"between": 4.66, "forward": 5.66, "backward": 6.23, "update": 6.98}
    row = plan_memory("small", gpus=2, micro_batch=1, accumulation=2, seconds=30, checkpointing=True,
                      backend="cpp", text_tokens=72, stop_rule=True, reserve_gib=0.0, stages=(3,),
                      device="cpu")[0]
    for moment, gib in measured.items():
        assert row.moments[moment] / GIB == pytest.approx(gib, rel=0.03), moment
    assert row.peak == "update" and row.total / GIB == pytest.approx(6.98, rel=0.03)


def test_zero_limits_are_the_engines() -> None:
    """The engine's generated DeepSpeed config leaves the bucket, live-parameter and
    sub-group sizes to DeepSpeed; the planner's defaults are DeepSpeed's. A user config's
    own sizes are read; a bad one is refused, naming the key."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from noencore.engine.zero import build_config

    ds = DeepSpeedZeroConfig()
    assert ZeroLimits() == ZeroLimits(ds.reduce_bucket_size, ds.max_live_parameters, ds.sub_group_size)
    for stage in (1, 2, 3):
        cfg = build_config(None, zero_stage=stage, micro_batch=1, world_size=2, grad_clip=1.0,
                           offload_optimizer=False, accumulation=2)
        assert zero_limits(cfg) == ZeroLimits()
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8}}
    assert zero_limits(user).reduce_bucket == 2 * 10**8
    assert plan_memory("large", gpus=8, stages=(2,), zero_config=user)[0].buckets == 2 * 2 * 10**8
    with pytest.raises(ValueError, match="reduce_bucket_size='auto'"):
        zero_limits({"zero_optimization": {"reduce_bucket_size": "auto"}})


@pytest.mark.parametrize(("cross", "checkpointing"), [(True, False), (False, False), (True, True)])
def test_saved_activations_match_autograd(cross: bool, checkpointing: bool, audiocraft_lm) -> None:
    """Count the bytes autograd saves in a real (small, bf16) audiocraft LM on the engine's
    path (text projection, hidden states gathered per codebook, fused op) and compare with
    the formula."""
    from noencore.models.adapter import codebook_rows
    from noencore.ops import linear_ce_ascent

    arch = MusicGenArch("tiny", dim=64, num_layers=3, num_heads=4, card=32, cross_attention=cross, text_dim=48)
    lm = audiocraft_lm(arch, device="cpu").to(torch.bfloat16)
    lm.transformer.checkpointing = "torch" if checkpointing else "none"
    batch, frames, cond_tokens = 2, 37, 7
    codes = torch.randint(0, arch.card, (batch, arch.n_q, frames))
    embeds = torch.randn(batch, cond_tokens, arch.text_dim, dtype=torch.bfloat16)
    proj = lm.condition_provider.conditioners["description"].output_proj
    param_storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cond = proj(embeds)
        if cross:  # resident through the step whether or not autograd saves it (checkpointing)
            saved[cond.untyped_storage().data_ptr()] = cond.untyped_storage().nbytes()
        parts = codebook_rows(lm, codes, None, {"description": (cond, torch.ones(batch, cond_tokens).long())})
        for p in parts:
            linear_ce_ascent(p.hidden, p.weight, p.targets, reduction="sum", backend="torch")
    seq = arch.sequence_length(frames / 50, cond_tokens)
    expected = saved_activation_bytes(arch, batch, seq, cond_tokens, act_bytes=2, checkpointing=checkpointing)
    measured = sum(saved.values())
    # The formula leaves out the fp32 LayerNorm statistics and attention log-sum-exp (< 3%).
    assert expected <= measured < 1.03 * expected, (expected, measured)


def _calibration():
    """benchmarks/plan_calibration.py (its measuring code, shared with the benchmark)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "plan_calibration" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "plan_calibration.py"
        spec = importlib.util.spec_from_file_location("plan_calibration", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while defined
        spec.loader.exec_module(module)
    return sys.modules["plan_calibration"]


def test_step_memory_matches_a_measured_step() -> None:
    """The planner's peaks of one step against the allocations torch's profiler records in
    a real step of a small MusicGen-shaped LM (fp32, the fused op's torch backend), without
    and with checkpointing; the memory checkpointing saves is compared too."""
    pytest.importorskip("audiocraft")
    cal = _calibration()
    model = cal.calibration_lm(layers=3, dim=256, heads=4)
    arch = cal.arch_of(model)
    batch, frames, text_tokens = 2, 100, 8
    peaks = {}
    for checkpointing in (False, True):
        predicted = step_memory(arch, batch, frames / 50, text_tokens=text_tokens, checkpointing=checkpointing,
                                act_bytes=4, backend="torch")
        measured = cal.measure(model, batch=batch, frames=frames, text_tokens=text_tokens,
                               checkpointing=checkpointing)
        for term, p, m in cal.rows(predicted, measured):
            assert 0.9 < m / p < 1.1, (checkpointing, term, p, m)
        peaks[checkpointing] = (predicted.peak, measured.peak)
    saved_predicted, saved_measured = (peaks[False][i] - peaks[True][i] for i in (0, 1))
    assert 0.9 < saved_measured / saved_predicted < 1.1


def test_op_constants_agree_with_the_backends() -> None:
    from noencore.ops import cpp, reference

    assert OP_CHUNK_ROWS["torch"] == reference.DEFAULT_CHUNK
    assert CPP_CHUNK_BYTES == cpp.CHUNK_BYTES
    pytest.importorskip("triton")
    from noencore.kernels import ce_ascent

    assert OP_CHUNK_ROWS["triton"] == ce_ascent.DEFAULT_CHUNK


def _step_row(arch, micro_batch: int, seconds: float, **kw) -> SimpleNamespace:
    """One micro-batch's ``activations`` and ``loss`` at its own peak (what the plan's rows
    show when the forward or backward is the step's peak), checked against the plan's
    forward and backward moments over what stays between steps."""
    step = step_memory(arch, micro_batch, seconds, **kw)
    row = plan_memory(arch, micro_batch=micro_batch, seconds=seconds, stages=(0,), **kw)[0]
    assert row.moments["forward"] - row.moments["between"] == step.forward_peak
    assert row.moments["backward"] - row.moments["between"] == step.backward_peak
    acts, loss = step.at_peak()
    return SimpleNamespace(activations=acts, loss=loss, total=acts + loss)


def test_activations_checkpointing_and_loss() -> None:
    arch = get_arch("large")
    # the step's own memory (stage 0, 1 GPU, no update temporaries: what one micro-batch adds)
    one, two = (_step_row(arch, micro_batch=b, seconds=30) for b in (1, 2))
    assert two.activations == 2 * one.activations  # at the forward's end: what autograd saved
    frames, tokens = 1500, 2 * arch.sequence_length(30, 64)
    d, f, layers = arch.dim, arch.ffn_dim, arch.num_layers
    # Saved per token: 20 D per layer without checkpointing, D with it, plus the output
    # norm's input; per window and text token: the cross-attention's keys and values (2 D
    # per layer), the projected text (D) and its T5 input (768). The checkpointed peak is in
    # the backward of the last layer, which is recomputed (19 D more per token: all but its
    # input, already kept) with the gradients in flight: the residual stream's (D, where the
    # freed output norm's input was), the feed-forward's (F) and one weight's (D x F).
    ckpt = _step_row(arch, micro_batch=2, seconds=30, checkpointing=True)
    assert ckpt.loss == 0
    text = 2 * 64
    plain = tokens * (layers * 20 * d + d) + text * (layers * 2 * d + d + 768)
    checkpointed = tokens * (layers * d + d + 19 * d + f) + text * (2 * d + d + 768) + d * f
    assert two.activations / ckpt.activations == pytest.approx(plain / checkpointed, rel=1e-6)
    assert two.activations / ckpt.activations > 10
    rows = 2 * arch.n_q * frames
    fused = loss_bytes(arch, 2, frames, act_bytes=2, backend="triton", chunk_rows=1024)
    # gathered hidden states and dh (2 x rows x D bf16), head gradients (K x V x D bf16), the
    # [1024, V] bf16 block, the block's partial head gradient in bf16 and fp32, the fp32 sum
    head = arch.card * d
    assert fused == 2 * 2 * rows * d + 2 * arch.n_q * head + 2 * 1024 * arch.card + (2 + 4 + 4) * head
    assert loss_bytes(arch, 2, frames, act_bytes=2, loss="materialized") == 2 * 4 * rows * arch.card
    mat = _step_row(arch, micro_batch=2, seconds=30, loss="materialized")
    # fp32 logits and their gradient (16 bytes per row and class) against bf16 copies and
    # gradients of the hidden states (8 bytes per row and width unit): at V = D = 2048 the
    # materialized loss is larger, not by much; both peak at the forward's end.
    assert mat.loss > two.loss and mat.total - mat.loss == two.total - two.loss


def test_accumulation_trades_time_for_activation_memory() -> None:
    """Splitting 8 windows per GPU into 2 micro-batches of 4 keeps every model state and
    halves what one micro-batch saves."""
    whole = plan_memory("large", gpus=8, micro_batch=8, accumulation=1)
    split = plan_memory("large", gpus=8, micro_batch=4, accumulation=2)
    step_whole, step_split = step_memory("large", 8, 30), step_memory("large", 4, 30)
    assert step_split.saved * 2 == step_whole.saved
    for w, s in zip(whole, split):
        assert (w.params, w.grads, w.optim) == (s.params, s.grads, s.optim)
        assert {k: w.moments[k] for k in ("between", "update")} == {k: s.moments[k] for k in ("between", "update")}
        assert w.moments["forward"] - s.moments["forward"] == step_whole.forward_peak - step_split.forward_peak
        assert w.global_batch == s.global_batch == 64
        assert "--accumulation 2" in s.flags() and "--batch-size 64" in s.flags()


@pytest.mark.parametrize(("text", "gib"), [("80GB", 80), ("80GiB", 80), ("80", 80), ("40", 40), (" 24 gb ", 24),
                                           ("81920MiB", 80), ("0.5TB", 512), ("40.5G", 40.5), (24, 24)])
def test_parse_memory(text, gib: float) -> None:
    assert parse_memory(text) == gib


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "0GB", "80XB", "80 GB of HBM", "8e1", "GB"])
def test_parse_memory_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=rf"GPU memory {re.escape(repr(text))}: expected a positive size"):
        parse_memory(text)


def test_split_batch() -> None:
    assert split_batch(64, 8, 2) == 4 and split_batch(64, 1, 64) == 1
    assert accumulation_choices(64, 8) == [1, 2, 4, 8] and accumulation_choices(64, 3) == []
    with pytest.raises(ValueError, match=r"global batch 64 .* 8 GPU\(s\) x 3 accumulation .* 64 / \(8 x 3\) "
                                         r".*divide it: 1, 2, 4, 8"):
        split_batch(64, 8, 3)
    with pytest.raises(ValueError, match="a multiple of 3"):
        split_batch(64, 3)
    with pytest.raises(ValueError, match="a multiple of 8"):
        split_batch(4, 8)
    with pytest.raises(ValueError, match="a multiple of 3"):
        recommend("large", 3, 80, 64)


def _search(model: str, gpus: int, gpu_mem: float, batch: int = 64) -> list[PlanRow]:
    """The rule of :func:`recommend`, written out over every configuration: fitting rows,
    without offload when any fits so; per (stage, checkpointing) the fewest accumulation
    steps; ranked offload < checkpointing < accumulation < stage; a slower row must need
    less memory than every faster one."""
    per_gpu = batch // gpus
    every = [plan_memory(model, gpus=gpus, gpu_mem_gib=gpu_mem, micro_batch=per_gpu // acc, accumulation=acc,
                         checkpointing=ckpt, offload_optimizer=off, stages=(stage,))[0]
             for off in (False, True) for ckpt in (False, True) for stage in range(4)
             for acc in range(1, per_gpu + 1) if per_gpu % acc == 0 and not (off and stage == 0)]
    fitting = [r for r in every if r.fits]
    if any(not r.offload_optimizer for r in fitting):
        fitting = [r for r in fitting if not r.offload_optimizer]
    fewest = {}
    for r in fitting:
        key = (r.stage, r.checkpointing, r.offload_optimizer)
        if key not in fewest or r.accumulation < fewest[key].accumulation:
            fewest[key] = r
    ranked = sorted(fewest.values(), key=lambda r: (r.offload_optimizer, r.checkpointing, r.accumulation, r.stage))
    return [r for i, r in enumerate(ranked) if all(r.total < s.total for s in ranked[:i])]


def _states_gib(model: str, stage: int, gpus: int) -> float:
    """bf16 ZeRO model states by hand: 2 + 2 + 12 bytes per parameter, partitioned."""
    psi = get_arch(model).n_params()
    owned = psi / gpus
    per_stage = {0: 16 * psi, 1: 4 * psi + 12 * owned, 2: 2 * psi + 14 * owned, 3: 16 * owned}
    return per_stage[stage] / GIB


def _saved_gib(model: str, micro_batch: int, seconds: float = 30.0) -> float:
    """Leading term of the activations without checkpointing: 20 D bf16 values per token
    per layer (12 D of attention, 2 F of feed-forward)."""
    arch = get_arch(model)
    tokens = micro_batch * (50 * seconds + 1)
    return arch.num_layers * 20 * arch.dim * tokens * 2 / GIB


def test_recommend_large_on_8x80() -> None:
    rows = recommend("facebook/musicgen-large", gpus=8, gpu_mem_gib=parse_memory("80GB"), batch=64, seconds=30)
    assert rows == _search("large", 8, 80)
    best = rows[0]
    # 8 windows per GPU fit without checkpointing once the optimizer states are partitioned
    # (ZeRO-1), not at ZeRO-0 where they alone take 48 GiB next to 44 GiB of activations.
    assert _states_gib("large", 0, 8) + _saved_gib("large", 8) > 80
    assert _states_gib("large", 1, 8) + _saved_gib("large", 8) + 2 + 1 < 80
    assert (best.stage, best.checkpointing, best.micro_batch, best.accumulation) == (1, False, 8, 1)
    assert best.total / GIB == pytest.approx(_states_gib("large", 1, 8) + _saved_gib("large", 8) + 2 + 1, rel=0.02)
    assert not any(r.offload_optimizer for r in rows)
    assert not any(r.stage == 0 and not r.checkpointing for r in rows)  # needs A=2: slower and bigger than #1
    assert all(r.fits and r.global_batch == 64 and r.gpus == 8 for r in rows)
    assert [r.total for r in rows] == sorted((r.total for r in rows), reverse=True)
    assert best.command("facebook/musicgen-large") == (
        "deepspeed --num_gpus 8 --module noencore unlearn --model facebook/musicgen-large --shards SHARDS "
        "--forget-ids IDS --method METHOD --out RUN --zero-stage 1 --batch-size 64 --accumulation 1 "
        "--frames 1500 --precision bf16")
    assert rows[-1].flags().endswith("--zero-stage 3 --batch-size 64 --accumulation 1 --frames 1500 "
                                     "--precision bf16 --checkpointing")


def test_recommend_medium_on_8x40_and_1x24() -> None:
    rows = recommend("medium", gpus=8, gpu_mem_gib=40, batch=64)
    assert rows == _search("medium", 8, 40)
    # Without checkpointing, 8 windows per GPU do not fit at ZeRO-1; 4 do.
    assert _states_gib("medium", 1, 8) + _saved_gib("medium", 8) > 40
    assert _states_gib("medium", 1, 8) + _saved_gib("medium", 4) + 2 + 1 < 40
    assert (rows[0].stage, rows[0].checkpointing, rows[0].micro_batch, rows[0].accumulation) == (1, False, 4, 2)
    assert any(r.checkpointing and r.accumulation == 1 for r in rows)
    assert "--accumulation 2" in rows[0].flags() and "--checkpointing" not in rows[0].flags()

    one = recommend("medium", gpus=1, gpu_mem_gib=parse_memory("24GB"), batch=64)
    assert one == _search("medium", 1, 24)
    # One GPU holds all 16 bytes per parameter without offload: 27 GiB, more than 24.
    assert _states_gib("medium", 1, 1) > 24
    assert one and all(r.offload_optimizer and "--offload-optimizer" in r.flags() for r in one)
    assert recommend("medium", gpus=1, gpu_mem_gib=24, offload=False) == []
    assert recommend("large", gpus=1, gpu_mem_gib=8) == []


def test_lowest_fitting_stage_of_the_fixed_table() -> None:
    rows = plan_memory("facebook/musicgen-large", gpus=8, gpu_mem_gib=80, micro_batch=8, seconds=30)
    table = format_plan_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert [r.fits for r in rows] == [False, True, True, True]
    assert lowest_fitting(rows).stage == 1
    assert lines[-1].startswith("recommended: ZeRO-1")
    assert f"{rows[0].total / GIB:7.2f}" in lines[2] and lines[2].rstrip().endswith("no")
    tight = plan_memory("large", gpus=1, gpu_mem_gib=16, micro_batch=8, seconds=30)
    assert lowest_fitting(tight) is None
    assert "none fits" in format_plan_table(tight)


@pytest.mark.parametrize(("stage", "checkpointing"), [(0, False), (1, True), (3, False)])
def test_max_micro_batch_is_the_boundary(stage: int, checkpointing: bool) -> None:
    kw = dict(gpus=8, gpu_mem_gib=80, seconds=30, checkpointing=checkpointing)
    best = max_micro_batch("large", stage, **kw)
    assert best >= 1
    assert plan_memory("large", micro_batch=best, stages=(stage,), **kw)[0].fits
    assert not plan_memory("large", micro_batch=best + 1, stages=(stage,), **kw)[0].fits
    assert max_micro_batch("large", 0, gpus=1, gpu_mem_gib=16) == 0
    assert max_micro_batch("small", 3, gpus=8, gpu_mem_gib=80, seconds=1, limit=50) == 50


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gpus=0"):
        plan_memory("small", gpus=0)
    with pytest.raises(ValueError, match="accumulation=0"):
        plan_memory("small", accumulation=0)
    with pytest.raises(ValueError, match="stages"):
        plan_memory("small", stages=(4,))
    with pytest.raises(ValueError, match="precision"):
        plan_memory("small", precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        plan_memory("small", loss="chunked")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        plan_memory("small", backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        plan_memory("small", reference_model=True)  # type: ignore[call-arg]  # NPO caches reference NLLs


def test_cli_answer(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "facebook/musicgen-large", "--gpus", "8", "--gpu-memory", "80GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = recommend("large", 8, 80, 64, 30)
    assert format_recommendations(rows) in out
    assert "global batch 64 windows of 30 s (1500 frames, 1501 steps)" in out
    assert f"run (#1): {rows[0].command('facebook/musicgen-large')}" in out
    for alias in (["--gpu-memory", "80GiB"], ["--gpu-mem", "80"], ["--gpu-memory", "80"]):
        assert main(argv[:-2] + alias) == 0
        assert capsys.readouterr().out == out
    assert main(argv + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["checkpointing"], r["accumulation"]) for r in data] == \
        [(r.stage, r.checkpointing, r.accumulation) for r in rows]
    assert data[0]["flags"] == rows[0].flags() and data[0]["total"] == rows[0].total
    assert main(["plan", "--model", "medium", "--gpu-memory", "24GB"]) == 0
    assert "nothing fits without optimizer offload" in capsys.readouterr().out
    assert main(["plan", "--model", "large", "--gpu-memory", "8"]) == 0
    assert "nothing fits" in capsys.readouterr().out
    assert main(["plan", "--gpu-memory", "80XB"]) == 2
    assert "GPU memory '80XB': expected a positive size" in capsys.readouterr().err
    assert main(["plan", "--gpus", "8", "--batch-size", "60"]) == 2
    assert "global batch 60 does not split into 8 GPU(s)" in capsys.readouterr().err
    assert main(argv + ["--checkpointing"]) == 2
    assert "the answer tries checkpointing both ways" in capsys.readouterr().err


def test_cli_fixed_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "facebook/musicgen-large", "--gpus", "8", "--gpu-mem", "80",
            "--micro-batch", "8", "--seconds", "30"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3257.0M trainable parameters" in out and "T5-base encoder (110M) frozen" in out
    assert "micro-batch 8 x 1 accumulation step(s) (global batch 64)" in out
    assert f"ZeRO-1 {max_micro_batch('large', 1, gpus=8, gpu_mem_gib=80, seconds=30)}," in out
    assert format_plan_table(plan_memory("large", gpus=8, gpu_mem_gib=80, micro_batch=8, seconds=30)) in out
    assert main(argv[:-4] + ["--batch", "8", "--seconds", "30"]) == 0  # the former flag
    assert capsys.readouterr().out == out
    assert main(argv[:-4] + ["--accumulation", "2"]) == 0  # the default global batch, 64
    assert "micro-batch 4 x 2 accumulation step(s) (global batch 64)" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["fits"]) for r in rows] == [(0, False), (1, True), (2, True), (3, True)]
    assert rows[3]["params"] == 2 * math.ceil(get_arch("large").n_params() / 8)
    assert main(argv[:-4] + ["--accumulation", "3"]) == 2
    err = capsys.readouterr().err
    assert "global batch 64 does not split into 8 GPU(s) x 3 accumulation step(s)" in err
    assert main(argv + ["--batch-size", "32"]) == 2
    assert "--batch-size 32 disagrees with --micro-batch 8 x --gpus 8" in capsys.readouterr().err
    assert main(["plan", "--model", "huge"]) == 2
    assert "unknown MusicGen model 'huge'" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpus", "0", "--micro-batch", "1"]) == 2


def test_cli_deepspeed_config_and_cpu_ranks(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """--deepspeed-config feeds the run's ZeRO sizes to the plan (a smaller ZeRO-3
    live-parameter limit gathers fewer weights), --cpu-ranks plans CPU ranks; both give
    what plan_memory gives for the same arguments; a bad file is named."""
    argv = ["plan", "--model", "small", "--gpus", "2", "--micro-batch", "1", "--json"]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1e7}}))
    runs = {}
    for name, extra in (("default", []), ("ds", ["--deepspeed-config", str(ds)]),
                        ("cpu", ["--cpu-ranks", "--reserve", "0"])):
        assert main(argv + extra) == 0
        runs[name] = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert runs["ds"][3]["total"] < runs["default"][3]["total"]
    assert runs["ds"][1]["total"] == runs["default"][1]["total"]  # a ZeRO-3 setting only
    want = plan_memory("small", gpus=2, gpu_mem_gib=80, micro_batch=1, reserve_gib=0,
                       device="cpu", stages=(3,))[0]
    assert runs["cpu"][3]["total"] == want.total
    want = plan_memory("small", gpus=2, gpu_mem_gib=80, micro_batch=1, stages=(3,),
                       zero_config=json.loads(ds.read_text()))[0]
    assert runs["ds"][3]["total"] == want.total
    (tmp_path / "bad.json").write_text("{not json")
    assert main(argv + ["--deepspeed-config", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: not a readable JSON file" in capsys.readouterr().err


def _save_checkpoint(folder, lm: torch.nn.Module, cfg: dict) -> None:
    from omegaconf import OmegaConf

    folder.mkdir()
    torch.save({"xp.cfg": OmegaConf.to_yaml(OmegaConf.create(cfg)), "best_state": lm.state_dict(),
                "version": "test"}, folder / "state_dict.bin")


def _cfg(arch: MusicGenArch) -> dict:
    """The keys of audiocraft's training config that describe ``arch``."""
    conditioners = {"description": {"model": "t5", "t5": {"name": "t5-base"}}}
    if arch.n_chroma:
        conditioners["self_wav"] = {"model": "chroma_stem", "chroma_stem": {"n_chroma": arch.n_chroma,
                                                                            "radix2_exp": 14}}
    return {
        "sample_rate": 32000,
        "transformer_lm": {"dim": arch.dim, "num_heads": arch.num_heads, "num_layers": arch.num_layers,
                           "hidden_scale": arch.hidden_scale, "n_q": arch.n_q, "card": arch.card,
                           "norm": "layer_norm", "bias_attn": arch.bias_attn, "bias_ff": arch.bias_ff,
                           "bias_proj": arch.bias_proj, "layer_scale": 1e-4 if arch.layer_scale else None},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": list(arch.delays)}},
        "fuser": {"cross": ["description"] if arch.cross_attention else [],
                  "prepend": [] if arch.cross_attention else sorted(conditioners)},
        "conditioners": conditioners,
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_arch_from_local_checkpoint(variant: str, tmp_path, audiocraft_lm) -> None:
    """A checkpoint in audiocraft's format (random weights) plans like its architecture."""
    arch = VARIANTS[variant]
    lm = audiocraft_lm(arch, device="cpu")
    _save_checkpoint(tmp_path / "ckpt", lm, _cfg(arch))
    read = get_arch(tmp_path / "ckpt")
    assert read.n_params() == sum(p.numel() for p in lm.parameters())
    assert {**vars(read), "name": arch.name} == vars(arch)
    rows = plan_memory(str(tmp_path / "ckpt"), gpus=2, stages=(3,))
    assert rows[0].params == 2 * math.ceil(arch.n_params() / 2)


def test_bad_checkpoints_are_named(tmp_path, audiocraft_lm) -> None:
    arch = VARIANTS["biases+layer_scale"]
    lm = audiocraft_lm(arch, device="cpu")
    _save_checkpoint(tmp_path / "lying", lm, {**_cfg(arch), "transformer_lm": {
        **_cfg(arch)["transformer_lm"], "num_layers": arch.num_layers + 1}})
    with pytest.raises(ValueError, match="lying.*config describes"):
        get_arch(tmp_path / "lying")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state_dict.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.*not a readable audiocraft LM checkpoint"):
        get_arch(tmp_path / "junk")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no audiocraft LM checkpoint"):
        get_arch(tmp_path / "empty")
