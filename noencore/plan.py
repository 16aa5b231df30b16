"""Memory planner: will unlearning MusicGen fit, per GPU, at each DeepSpeed ZeRO stage?

The figures are computed from the LM's architecture (audiocraft's ``LMModel`` as MusicGen
configures it: pre-norm transformer, no biases in attention, feed-forward or the codebook
heads, memory-efficient attention, a T5 projection, K embeddings and K heads; a local
checkpoint is described by its own config), not looked up. What is counted, per GPU:

- **params / grads / optim** (the model states), with the standard ZeRO accounting for
  bf16 mixed precision: 2 bytes of bf16 weights + 2 of bf16 gradients + 12 of AdamW state
  (fp32 master weights, m and v) per trainable parameter. Stage 1 partitions the optimizer
  states over the N GPUs, stage 2 the gradients too, stage 3 the weights too. In fp32 the
  bytes are 4 + 4 + 8 (no master copy). ``offload_optimizer`` moves the optimizer states
  (and the update, with an fp32 gradient partition; from stage 2 the gradient partitions
  too) to CPU memory (stages 1-3, as DeepSpeed allows). ``fp32_grads`` adds the fp32
  gradient partition DeepSpeed's bf16 optimizers keep on the GPU (4 bytes per owned
  parameter), as DeepSpeed's own estimators count it.
- **activations** saved for the backward pass for a micro-batch of B sequences of S steps,
  with or without activation checkpointing (per transformer layer).
- **loss**: the fused linear-cross-entropy keeps one block of ``chunk_rows x V`` fp32 logits
  at a time; the materialised baseline keeps ``B x K x S x V`` fp32 logits plus their
  gradient.
- **other**: a fixed reserve (CUDA context, allocator fragmentation, communication
  buckets) plus, at stage 3, the working set of gathered weights (the layer in use and the
  one being prefetched), plus, with ``reference_model`` (NPO and its kin compare with the
  frozen original), a bf16 copy of the weights (partitioned at stage 3).

The T5 text encoder is frozen and its outputs are precomputed into the condition cache, so
it is not resident during training and is not counted (only the trainable projection from
T5's 768 features to the LM width is). The EnCodec codec is not resident either (tokens
are precomputed).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

GIB = 1024**3
T5_BASE_DIM = 768
T5_BASE_ENCODER_PARAMS = 109_628_544  # frozen and cached: reported, never resident
ADAMW_STATE_BYTES = {"bf16": 12, "fp32": 8}  # fp32 master + m + v / m + v
WEIGHT_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class MusicGenArch:
    """The shape of a MusicGen LM, as audiocraft builds it.

    ``cross_attention``: text conditions enter through cross-attention in every layer
    (text-only models); the melody models instead *prepend* the projected chroma and text
    to the sequence (no cross-attention). ``chroma_hop``: audio samples per chroma frame of
    the melody conditioner (STFT window 2**14, hop a quarter of it). ``text_dim``: width of
    the text encoder's output (T5-base: 768). The bias and layer-scale flags are False in
    every released MusicGen; they are read from a checkpoint's config when it says otherwise.
    """

    name: str
    dim: int
    num_layers: int
    num_heads: int
    hidden_scale: int = 4
    n_q: int = 4
    card: int = 2048
    delays: tuple[int, ...] = (0, 1, 2, 3)
    cross_attention: bool = True
    n_chroma: int = 0
    chroma_hop: int = 0
    frame_rate: int = 50
    sample_rate: int = 32000
    text_dim: int = T5_BASE_DIM
    bias_attn: bool = False
    bias_ff: bool = False
    bias_proj: bool = False
    layer_scale: bool = False

    @property
    def ffn_dim(self) -> int:
        return self.hidden_scale * self.dim

    def layer_params(self) -> int:
        """Parameters of one transformer layer: fused QKV + output projection, optional
        cross-attention with its LayerNorm, the feed-forward pair, two LayerNorms (weight
        and bias), and the optional biases and per-channel layer scales."""
        d, f = self.dim, self.ffn_dim
        attention = 4 * d * d + (4 * d if self.bias_attn else 0)
        cross = (attention + 2 * d) if self.cross_attention else 0
        ffn = 2 * d * f + ((f + d) if self.bias_ff else 0)
        scales = (3 if self.cross_attention else 2) * d if self.layer_scale else 0
        return attention + cross + ffn + 2 * 2 * d + scales

    def param_breakdown(self) -> dict[str, int]:
        """Trainable parameter counts by part (the T5 encoder is frozen: not included)."""
        d = self.dim
        parts = {
            "embeddings": self.n_q * (self.card + 1) * d,  # +1: the special (masked) token
            "transformer": self.num_layers * self.layer_params(),
            "out_norm": 2 * d,
            "heads": self.n_q * self.card * (d + (1 if self.bias_proj else 0)),
            "text_projection": self.text_dim * d + d,
        }
        if self.n_chroma:
            parts["chroma_projection"] = self.n_chroma * d + d
        return parts

    def n_params(self) -> int:
        return sum(self.param_breakdown().values())

    def sequence_length(self, seconds: float, text_tokens: int) -> int:
        """Steps S the transformer sees for a clip of ``seconds``: the codec frames, plus the
        delay pattern's max delay and its initial special step, plus (melody) the
        prepended chroma frames and text tokens."""
        frames = math.ceil(self.frame_rate * seconds)
        steps = frames + max(self.delays) + 1
        if not self.cross_attention:
            steps += text_tokens
            if self.n_chroma:
                steps += math.floor(seconds * self.sample_rate / self.chroma_hop) + 1
        return steps


def _arch(name: str, dim: int, layers: int, heads: int, *, stereo: bool = False, melody: bool = False) -> MusicGenArch:
    extra: dict = {}
    if stereo:  # two interleaved EnCodec streams: 8 codebooks, delays 0,0,1,1,2,2,3,3
        extra.update(n_q=8, delays=(0, 0, 1, 1, 2, 2, 3, 3))
    if melody:
        extra.update(cross_attention=False, n_chroma=12, chroma_hop=2**14 // 4)
    return MusicGenArch(name, dim, layers, heads, **extra)


ARCHITECTURES: dict[str, MusicGenArch] = {
    a.name: a
    for a in (
        _arch("facebook/musicgen-small", 1024, 24, 16),
        _arch("facebook/musicgen-medium", 1536, 48, 24),
        _arch("facebook/musicgen-large", 2048, 48, 32),
        _arch("facebook/musicgen-melody", 1536, 48, 24, melody=True),
        _arch("facebook/musicgen-melody-large", 2048, 48, 32, melody=True),
        _arch("facebook/musicgen-stereo-small", 1024, 24, 16, stereo=True),
        _arch("facebook/musicgen-stereo-medium", 1536, 48, 24, stereo=True),
        _arch("facebook/musicgen-stereo-large", 2048, 48, 32, stereo=True),
        _arch("facebook/musicgen-stereo-melody", 1536, 48, 24, stereo=True, melody=True),
        _arch("facebook/musicgen-stereo-melody-large", 2048, 48, 32, stereo=True, melody=True),
    )
}


def get_arch(model: str | os.PathLike[str] | MusicGenArch) -> MusicGenArch:
    """Look up ``model`` by hub id or short name (``"large"``, ``"musicgen-melody"``), or
    read it from a local audiocraft checkpoint (see :func:`arch_from_checkpoint`)."""
    if isinstance(model, MusicGenArch):
        return model
    model = str(model)
    for key in (model, f"facebook/{model}", f"facebook/musicgen-{model}"):
        if key in ARCHITECTURES:
            return ARCHITECTURES[key]
    if os.path.exists(model):
        return arch_from_checkpoint(model)
    names = ", ".join(n.removeprefix("facebook/musicgen-") for n in ARCHITECTURES)
    raise ValueError(f"unknown MusicGen model {model!r}: choose one of {names} (or their facebook/ hub ids), "
                     "or pass a local audiocraft checkpoint folder")


def _counted_keys(key: str) -> bool:
    """State-dict keys of the parts the planner models (not buffers such as chroma filters)."""
    return key.startswith(("transformer.", "emb.", "linears.", "out_norm.")) or ".output_proj." in key


def arch_from_checkpoint(path: str | os.PathLike[str]) -> MusicGenArch:
    """The architecture of a local audiocraft LM checkpoint (a folder holding
    ``state_dict.bin``, or the file itself: ``{"xp.cfg": yaml, "best_state": state dict}``).

    Sizes come from the config; the text and chroma projection widths from the weights.
    The parameter count derived from them must equal the checkpoint's own (else the
    variant is one the planner does not model, and it says so). The file is memory-mapped:
    nothing is read beyond the config and the tensor headers.
    """
    import torch
    from omegaconf import OmegaConf

    file = Path(path)
    if file.is_dir():
        file = file / "state_dict.bin"
    if not file.is_file():
        raise ValueError(f"{file}: no audiocraft LM checkpoint here (expected a folder with state_dict.bin)")
    try:
        pkg = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        cfg = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]), resolve=True)
        state = pkg["best_state"]
    except Exception as exc:
        raise ValueError(f"{file}: not a readable audiocraft LM checkpoint ({exc}); "
                         "pass a folder written by audiocraft or noencore's save_musicgen") from exc
    tl = cfg["transformer_lm"]
    if tl.get("norm", "layer_norm") != "layer_norm" or tl.get("lm_model", "transformer_lm") != "transformer_lm":
        raise ValueError(f"{file}: norm {tl.get('norm')!r} is not modelled by the planner (layer_norm only)")
    fuser = cfg.get("fuser") or {}
    conditioners = cfg.get("conditioners") or {}
    proj = {k.split(".")[2]: v.shape for k, v in state.items()
            if k.startswith("condition_provider.conditioners.") and k.endswith(".output_proj.weight")}
    chroma = [name for name, c in conditioners.items() if c.get("model") == "chroma_stem"]
    text = [name for name in proj if name not in chroma]
    if len(text) != 1:
        raise ValueError(f"{file}: expected one text conditioner with an output projection, found {sorted(proj)}")
    pattern = cfg.get("codebooks_pattern") or {}
    if pattern.get("modeling", "delay") != "delay":
        raise ValueError(f"{file}: codebook pattern {pattern.get('modeling')!r} is not modelled (delay only)")
    sample_rate = int(cfg.get("sample_rate", 32000))
    arch = MusicGenArch(
        name=str(path), dim=int(tl["dim"]), num_layers=int(tl["num_layers"]), num_heads=int(tl["num_heads"]),
        hidden_scale=int(tl.get("hidden_scale", 4)), n_q=int(tl["n_q"]), card=int(tl["card"]),
        delays=tuple(int(x) for x in pattern.get("delay", {}).get("delays", range(int(tl["n_q"])))),
        cross_attention=bool(fuser.get("cross")) or bool(tl.get("cross_attention")),
        n_chroma=int(proj[chroma[0]][1]) if chroma else 0,
        chroma_hop=2 ** int(conditioners[chroma[0]]["chroma_stem"].get("radix2_exp", 12)) // 4 if chroma else 0,
        frame_rate=round(sample_rate / 640),  # MusicGen's EnCodec: one frame per 640 samples
        sample_rate=sample_rate, text_dim=int(proj[text[0]][1]),
        bias_attn=bool(tl.get("bias_attn", True)), bias_ff=bool(tl.get("bias_ff", True)),
        bias_proj=bool(tl.get("bias_proj", True)), layer_scale=tl.get("layer_scale") is not None,
    )
    actual = sum(v.numel() for k, v in state.items() if _counted_keys(k))
    if actual != arch.n_params():
        raise ValueError(f"{file}: the checkpoint holds {actual} parameters but its config describes "
                         f"{arch.n_params()}; this LM variant is not modelled by the planner")
    return arch


@dataclass(frozen=True)
class PlanRow:
    """One configuration's memory per GPU (all sizes in bytes)."""

    stage: int
    offload_optimizer: bool
    params: int
    grads: int
    optim: int
    activations: int
    loss: int
    other: int
    cpu: int  # host memory per rank for offloaded optimizer states
    gpu_mem: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.activations + self.loss + self.other

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem


def _layer_saved(arch: MusicGenArch, batch: int, seq: int, cond_tokens: int) -> int:
    """Elements one transformer layer keeps for its backward pass (memory-efficient
    attention: no S x S scores). Per token: self-attention 6D (LayerNorm input and output,
    Q, K, V, attention output), cross-attention 4D (LayerNorm input and output, Q, attention
    output) plus K and V over the condition tokens, feed-forward 2D + 2F (LayerNorm input
    and output, the GELU's input and output)."""
    d, f = arch.dim, arch.ffn_dim
    per_token = 6 * d + 2 * d + 2 * f + (4 * d if arch.cross_attention else 0)
    return batch * seq * per_token + (batch * cond_tokens * 2 * d if arch.cross_attention else 0)


def saved_activation_bytes(arch: MusicGenArch, batch: int, seq: int, cond_tokens: int, *,
                           act_bytes: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps after the LM's forward, up to the hidden states before the heads.

    Without checkpointing: every layer's :func:`_layer_saved` (the first layer's includes the
    embedding sum); with checkpointing (per layer): only each layer's input, B x S x D.
    Both: the output norm's input and output (2 x B x S x D) and the condition tensor
    (B x C x D, cross-attention models). Parameters and the loss are not included.
    (Checked against the tensors autograd saves for a small audiocraft LM in the tests.)
    """
    cond = batch * cond_tokens * arch.dim if arch.cross_attention else 0
    per_layer = batch * seq * arch.dim if checkpointing else _layer_saved(arch, batch, seq, cond_tokens)
    return act_bytes * (arch.num_layers * per_layer + 2 * batch * seq * arch.dim + cond)


def activation_bytes(arch: MusicGenArch, batch: int, seq: int, cond_tokens: int, *,
                     checkpointing: bool, act_bytes: int) -> int:
    """Peak activation memory of one micro-batch's forward and backward, per GPU:
    :func:`saved_activation_bytes`, plus one layer's worth of gradients in flight during the
    backward pass, plus (checkpointing) the one layer being recomputed at a time."""
    layer = _layer_saved(arch, batch, seq, cond_tokens)
    saved = saved_activation_bytes(arch, batch, seq, cond_tokens, act_bytes=act_bytes, checkpointing=checkpointing)
    return saved + act_bytes * layer * (2 if checkpointing else 1)


def loss_bytes(arch: MusicGenArch, batch: int, seq: int, *, loss: Literal["fused", "materialized"],
               chunk_rows: int) -> int:
    """Extra memory of the loss over the K codebook heads (V = card).

    ``fused``: one [chunk_rows, V] fp32 block of logits (its gradient is written in place)
    plus fp32 per-row statistics (log-sum-exp, loss). ``materialized``: all [B, K, S, V]
    logits in fp32 plus their gradient of the same size.
    """
    rows = batch * arch.n_q * seq
    if loss == "fused":
        return 4 * min(chunk_rows, rows) * arch.card + 2 * 4 * rows
    if loss == "materialized":
        return 2 * 4 * rows * arch.card
    raise ValueError(f"loss={loss!r}: choose 'fused' or 'materialized'")


def plan_memory(
    model: str | os.PathLike[str] | MusicGenArch = "facebook/musicgen-large",
    *,
    gpus: int = 1,
    gpu_mem_gib: float = 80.0,
    batch: int = 1,
    seconds: float = 30.0,
    checkpointing: bool = False,
    loss: Literal["fused", "materialized"] = "fused",
    chunk_rows: int = 8192,
    offload_optimizer: bool = False,
    precision: Literal["bf16", "fp32"] = "bf16",
    text_tokens: int = 64,
    reserve_gib: float = 2.0,
    reference_model: bool = False,
    fp32_grads: bool = False,
    stages: tuple[int, ...] = (0, 1, 2, 3),
) -> list[PlanRow]:
    """Per-GPU memory of unlearning ``model`` at each ZeRO stage, one :class:`PlanRow` each.

    Args:
        model: hub id or short name (see :data:`ARCHITECTURES`), a local audiocraft
            checkpoint folder, or a :class:`MusicGenArch`.
        gpus: data-parallel GPUs N (ZeRO partitions over them).
        gpu_mem_gib: memory of one GPU, GiB.
        batch: micro-batch per GPU (sequences per forward/backward).
        seconds: clip length; S = 50 * seconds + max delay + 1 (+ prepended conditions).
        checkpointing: activation checkpointing per transformer layer.
        loss: ``fused`` (noencore's op) or ``materialized`` (full logits, the baseline).
        chunk_rows: rows per block of the fused loss.
        offload_optimizer: optimizer states on CPU (ZeRO stages 1-3).
        precision: ``bf16`` mixed precision (fp32 master weights) or plain ``fp32``.
        text_tokens: T5 tokens per caption (cross-attention keys, or prepended for melody).
        reserve_gib: fixed per-GPU reserve (CUDA context, fragmentation, comm buckets).
        reference_model: a frozen copy of the weights is resident too (NPO, SimNPO...).
        fp32_grads: also count the fp32 gradient partition DeepSpeed's bf16 optimizers keep
            for the update (4 bytes per owned parameter; DeepSpeed's own estimators count
            it: 18 bytes per parameter instead of 16 at stages 2-3).
        stages: ZeRO stages to plan.
    """
    arch = get_arch(model)
    if gpus < 1 or batch < 1 or seconds <= 0 or gpu_mem_gib <= 0 or chunk_rows < 1:
        raise ValueError(f"gpus={gpus}, batch={batch}, seconds={seconds}, gpu_mem_gib={gpu_mem_gib}, "
                         f"chunk_rows={chunk_rows}: all must be positive")
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision={precision!r}: choose 'bf16' or 'fp32'")
    bad = [s for s in stages if s not in (0, 1, 2, 3)]
    if bad:
        raise ValueError(f"ZeRO stages {bad} do not exist: choose among 0, 1, 2, 3")
    n_params = arch.n_params()
    shard = math.ceil(n_params / gpus)  # DeepSpeed pads partitions to equal size
    w = WEIGHT_BYTES[precision]
    seq = arch.sequence_length(seconds, text_tokens)
    acts = activation_bytes(arch, batch, seq, text_tokens, checkpointing=checkpointing, act_bytes=w)
    loss_mem = loss_bytes(arch, batch, seq, loss=loss, chunk_rows=chunk_rows)
    reserve = int(reserve_gib * GIB)
    biggest_module = max(arch.layer_params(), arch.n_q * arch.card * arch.dim)
    rows = []
    for stage in stages:
        notes: list[str] = []
        part = shard if stage >= 1 else n_params  # what this GPU owns of the optimizer's data
        params = w * (shard if stage == 3 else n_params)
        grads = w * (shard if stage >= 2 else n_params)
        fp32_grad_part = 4 * part if (fp32_grads and precision == "bf16") else 0
        optim = ADAMW_STATE_BYTES[precision] * part
        cpu = 0
        if offload_optimizer and stage == 0:
            notes.append("optimizer offload needs ZeRO >= 1")
        elif offload_optimizer:
            # The update runs on the CPU: states and an fp32 gradient partition live there,
            # and from stage 2 the reduced gradient partitions leave the GPU as well.
            cpu, optim, fp32_grad_part = optim + 4 * part, 0, 0
            grads = grads if stage == 1 else 0
        gathered = 2 * biggest_module * w if stage == 3 else 0  # in use + prefetched
        reference = WEIGHT_BYTES["bf16"] * (shard if stage == 3 else n_params) if reference_model else 0
        rows.append(PlanRow(
            stage=stage, offload_optimizer=offload_optimizer and stage > 0, params=params,
            grads=grads + fp32_grad_part, optim=optim, activations=acts, loss=loss_mem,
            other=reserve + gathered + reference, cpu=cpu, gpu_mem=int(gpu_mem_gib * GIB), notes=tuple(notes),
        ))
    return rows


def max_batch(model: str | os.PathLike[str] | MusicGenArch, stage: int, *, limit: int = 4096, **kwargs) -> int:
    """Largest micro-batch per GPU that fits at ``stage`` (0 when even 1 does not), up to
    ``limit``; ``kwargs`` as for :func:`plan_memory` (memory grows with the batch, so a
    doubling then a bisection finds it)."""
    def fits(b: int) -> bool:
        return plan_memory(model, batch=b, stages=(stage,), **kwargs)[0].fits

    if not fits(1):
        return 0
    lo = 1  # fits
    while lo < limit and fits(min(2 * lo, limit)):
        lo = min(2 * lo, limit)
    hi = min(2 * lo, limit + 1)  # does not fit (or past the limit)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def recommend(rows: list[PlanRow]) -> PlanRow | None:
    """The lowest stage that fits (least communication), preferring no offload; or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: (r.offload_optimizer, r.stage), default=None)


def format_plan_table(rows: list[PlanRow]) -> str:
    """A fixed-width text table, GiB per GPU, one line per stage, and the recommendation."""
    def gib(x: int) -> str:
        return f"{x / GIB:8.2f}"

    head = (f"{'ZeRO':>4} {'offload':>7} {'params':>8} {'grads':>8} {'optim':>8} {'activ':>8} "
            f"{'loss':>8} {'other':>8} {'total':>8} {'fits':>4}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.stage:>4} {'cpu' if r.offload_optimizer else '-':>7} {gib(r.params)} {gib(r.grads)} "
                     f"{gib(r.optim)} {gib(r.activations)} {gib(r.loss)} {gib(r.other)} {gib(r.total)} "
                     f"{'yes' if r.fits else 'no':>4}" + (f"  ({'; '.join(r.notes)})" if r.notes else ""))
    best = recommend(rows)
    if best is None:
        lines.append("recommended: none fits; try --checkpointing, a smaller --batch or --seconds, "
                     "--offload, or more GPUs")
    else:
        headroom = (best.gpu_mem - best.total) / GIB
        how = (" with optimizer offload" if best.offload_optimizer
               else " (nothing partitioned: one process or plain data parallel)" if best.stage == 0 else "")
        lines.append(f"recommended: ZeRO-{best.stage}{how}, {best.total / GIB:.1f} of "
                     f"{best.gpu_mem / GIB:.0f} GiB per GPU ({headroom:.1f} GiB free)")
    return "\n".join(lines)

