"""The memory planner: parameter counts against audiocraft, ZeRO accounting, activations
against what autograd really saves, the table and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from noencore.cli import main
from noencore.plan import (
    ARCHITECTURES,
    GIB,
    MusicGenArch,
    format_plan_table,
    get_arch,
    loss_bytes,
    max_batch,
    plan_memory,
    recommend,
    saved_activation_bytes,
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
            fuser = ConditionFuser({"cross": ["description"]} if arch.cross_attention
                                   else {"prepend": sorted(conditioners)})
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
    pattern = DelayedPatternProvider(arch.n_q, list(arch.delays)).get_pattern(math.ceil(50 * seconds))
    assert arch.sequence_length(seconds, text_tokens=17) == len(pattern.layout)


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
    rows = {r.stage: r for r in plan_memory(name, gpus=gpus, batch=2, seconds=5)}
    assert (rows[0].params, rows[0].grads, rows[0].optim) == (2 * psi, 2 * psi, 12 * psi)
    assert (rows[1].params, rows[1].grads, rows[1].optim) == (2 * psi, 2 * psi, 12 * shard)
    assert (rows[2].params, rows[2].grads, rows[2].optim) == (2 * psi, 2 * shard, 12 * shard)
    assert (rows[3].params, rows[3].grads, rows[3].optim) == (2 * shard, 2 * shard, 12 * shard)
    states = [r.params + r.grads + r.optim for r in rows.values()]
    assert states == sorted(states, reverse=True)
    if gpus > 1:  # the stage-3 gather working set never outweighs what it partitions
        totals = [r.total for r in rows.values()]
        assert totals == sorted(totals, reverse=True) and totals[0] > totals[3]
    # Activations and loss do not depend on the stage.
    assert len({(r.activations, r.loss) for r in rows.values()}) == 1
    fp32 = plan_memory(name, gpus=gpus, precision="fp32", stages=(0, 3))
    assert (fp32[0].params, fp32[0].grads, fp32[0].optim) == (4 * psi, 4 * psi, 8 * psi)
    assert fp32[1].params == 4 * shard


def test_reference_model() -> None:
    psi = get_arch("medium").n_params()
    base = plan_memory("medium", gpus=4)
    ref = plan_memory("medium", gpus=4, reference_model=True)
    extra = [r.other - b.other for r, b in zip(ref, base)]
    assert extra == [2 * psi, 2 * psi, 2 * psi, 2 * math.ceil(psi / 4)]


def test_optimizer_offload() -> None:
    psi = get_arch("large").n_params()
    shard = math.ceil(psi / 4)
    rows = plan_memory("large", gpus=4, offload_optimizer=True)
    assert rows[0].optim == 12 * psi and not rows[0].offload_optimizer and rows[0].notes
    for r in rows[1:]:
        assert r.optim == 0 and r.offload_optimizer and r.cpu == 16 * shard
    assert [r.grads for r in rows] == [2 * psi, 2 * psi, 0, 0]
    assert "optimizer offload needs ZeRO >= 1" in format_plan_table(rows)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_agree_with_deepspeed_estimators(gpus: int) -> None:
    """DeepSpeed's own estimators agree: at stage 2, 2 bytes of weights per parameter plus 18
    per owned one (bf16 and fp32 gradients, fp32 master, m, v). At stage 3 (where 4 bytes
    per parameter of the largest layer is the gathered working set, as here) its estimator
    leaves out the bf16 gradient partition, which the planner keeps: exactly 2 bytes per
    owned parameter more."""
    zero2 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch = get_arch("large")
    psi, largest = arch.n_params(), arch.layer_params()
    reserve = int(2.0 * GIB)
    for offload in (False, True):
        rows = plan_memory(arch, gpus=gpus, fp32_grads=True, offload_optimizer=offload)
        states = [r.params + r.grads + r.optim for r in rows]
        ds2 = zero2.estimate_zero2_model_states_mem_needs(psi, gpus, 1, cpu_offload=offload)[1]
        assert abs(states[2] - ds2) <= 18 * gpus  # DeepSpeed rounds the partition down
        ds3 = estimate_zero3_model_states_mem_needs(psi, largest, gpus, 1, cpu_offload=offload,
                                                    cpu_offload_params=False)[1]
        bf16_grad_part = 0 if offload else 2 * math.ceil(psi / gpus)
        assert abs(states[3] + rows[3].other - reserve - bf16_grad_part - ds3) <= 18 * gpus
    plain = plan_memory(arch, gpus=gpus)
    fp32 = plan_memory(arch, gpus=gpus, fp32_grads=True)
    assert [f.grads - p.grads for f, p in zip(fp32, plain)] == [4 * psi] + [4 * math.ceil(psi / gpus)] * 3


@pytest.mark.parametrize(("cross", "checkpointing"), [(True, False), (False, False), (True, True)])
def test_saved_activations_match_autograd(cross: bool, checkpointing: bool, audiocraft_lm) -> None:
    """Count the bytes autograd saves in a real (small, bf16) audiocraft LM forward and
    compare with the formula."""
    arch = MusicGenArch("tiny", dim=64, num_layers=3, num_heads=4, card=32, cross_attention=cross)
    lm = audiocraft_lm(arch, device="cpu").to(torch.bfloat16)
    lm.transformer.checkpointing = "torch" if checkpointing else "none"
    batch, seq, cond_tokens = 2, 41, 7
    codes = torch.randint(0, arch.card, (batch, arch.n_q, seq))
    cond = torch.randn(batch, cond_tokens, arch.dim, dtype=torch.bfloat16)
    param_storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    # The condition tensor is resident during the step whether or not autograd saves it.
    saved = {cond.untyped_storage().data_ptr(): cond.untyped_storage().nbytes()} if cross else {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if t.is_floating_point() and storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = sum(lm.emb[k](codes[:, k]) for k in range(arch.n_q))
        hidden = lm.out_norm(lm.transformer(x, cross_attention_src=cond if cross else None))
        torch.stack([head(hidden) for head in lm.linears], dim=1).float().sum().backward()
    expected = saved_activation_bytes(arch, batch, seq, cond_tokens if cross else 0, act_bytes=2,
                                      checkpointing=checkpointing)
    measured = sum(saved.values())
    # The formula leaves out the fp32 LayerNorm statistics and attention log-sum-exp (< 3%).
    assert expected <= measured < 1.03 * expected, (expected, measured)


def test_activations_checkpointing_and_loss() -> None:
    arch = get_arch("large")
    one, two = (plan_memory(arch, batch=b, seconds=30, stages=(0,))[0] for b in (1, 2))
    assert two.activations == pytest.approx(2 * one.activations, rel=1e-9)
    ckpt = plan_memory(arch, batch=2, seconds=30, checkpointing=True, stages=(0,))[0]
    assert ckpt.activations < two.activations / 5
    seq = arch.sequence_length(30, 64)
    rows = 2 * arch.n_q * seq
    assert loss_bytes(arch, 2, seq, loss="materialized", chunk_rows=8192) == 2 * 4 * rows * arch.card
    assert loss_bytes(arch, 2, seq, loss="fused", chunk_rows=1024) == 4 * 1024 * arch.card + 8 * rows
    mat = plan_memory(arch, batch=2, seconds=30, loss="materialized", stages=(0,))[0]
    assert mat.loss > 2 * two.loss and mat.total - mat.loss == two.total - two.loss


def test_table_and_recommendation_for_the_documented_example() -> None:
    rows = plan_memory("facebook/musicgen-large", gpus=8, gpu_mem_gib=80, batch=8, seconds=30)
    table = format_plan_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 4 + 1
    assert [r.fits for r in rows] == [False, True, True, True]
    assert recommend(rows).stage == 1
    assert lines[-1].startswith("recommended: ZeRO-1")
    assert f"{rows[0].total / GIB:8.2f}" in lines[2] and lines[2].rstrip().endswith("no")
    tight = plan_memory("large", gpus=1, gpu_mem_gib=16, batch=8, seconds=30)
    assert recommend(tight) is None
    assert "none fits" in format_plan_table(tight)


@pytest.mark.parametrize(("stage", "checkpointing"), [(0, False), (1, True), (3, False)])
def test_max_batch_is_the_boundary(stage: int, checkpointing: bool) -> None:
    kw = dict(gpus=8, gpu_mem_gib=80, seconds=30, checkpointing=checkpointing)
    best = max_batch("large", stage, **kw)
    assert best >= 1
    assert plan_memory("large", batch=best, stages=(stage,), **kw)[0].fits
    assert not plan_memory("large", batch=best + 1, stages=(stage,), **kw)[0].fits
    assert max_batch("large", 0, gpus=1, gpu_mem_gib=16) == 0
    assert max_batch("small", 3, gpus=8, gpu_mem_gib=80, seconds=1, limit=50) == 50


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="gpus=0"):
        plan_memory("small", gpus=0)
    with pytest.raises(ValueError, match="stages"):
        plan_memory("small", stages=(4,))
    with pytest.raises(ValueError, match="precision"):
        plan_memory("small", precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loss"):
        plan_memory("small", loss="chunked")  # type: ignore[arg-type]


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "facebook/musicgen-large", "--gpus", "8", "--gpu-mem", "80",
            "--batch", "8", "--seconds", "30"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3257.0M trainable parameters" in out and "T5-base encoder (110M) frozen" in out
    assert f"ZeRO-1 {max_batch('large', 1, gpus=8, gpu_mem_gib=80, seconds=30)}," in out
    assert format_plan_table(plan_memory("large", gpus=8, gpu_mem_gib=80, batch=8, seconds=30)) in out
    assert "loss memory per GPU: fused" in out
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["fits"]) for r in rows] == [(0, False), (1, True), (2, True), (3, True)]
    assert rows[3]["params"] == 2 * math.ceil(get_arch("large").n_params() / 8)
    assert main(["plan", "--model", "huge"]) == 2
    assert "unknown MusicGen model 'huge'" in capsys.readouterr().err
    assert main(["plan", "--model", "small", "--gpus", "0"]) == 2


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
