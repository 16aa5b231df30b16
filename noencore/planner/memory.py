"""Memory planner: which DeepSpeed ZeRO stage, micro-batch, gradient accumulation and
activation checkpointing fit unlearning a MusicGen model on G GPUs, and how much memory
each GPU then needs.

:func:`recommend` answers the question directly (a model, a GPU count, a GPU memory, a
global batch and a clip length -> the configurations that fit, fastest first);
:func:`plan_memory` gives the per-stage breakdown of one fixed micro-batch.

The figures are computed from the LM's architecture (audiocraft's ``LMModel`` as MusicGen
configures it: pre-norm transformer, no biases in attention, feed-forward or the codebook
heads, memory-efficient attention, a T5 projection, K embeddings and K heads; a local
checkpoint is described by its own config), not looked up. All sizes are bytes per GPU
unless a name ends in ``_gib`` (GiB = 2**30 bytes). The T5 text encoder is frozen and its
outputs are cached before training, so it is not resident (only its trainable projection
to the LM width is); neither is the EnCodec codec (tokens are precomputed). NPO, SimNPO
and ``remain_anchor`` compare with the starting model through reference NLLs cached once
before training (one float per window), not through a resident reference model, so they
need no extra GPU memory.

Symbols: Psi trainable parameters, G GPUs, w bytes per weight, gradient and activation
(2 in bf16, 4 in fp32), b the micro-batch per GPU (windows), T codec frames per window, S
steps the transformer sees (T + 1, plus prepended conditions), t = b S tokens,
D the width, F = 4 D the feed-forward width, L text tokens per caption, K codebooks, V
their card (2048), N_k = b T rows per codebook.

Model states (``params``, ``grads``, ``optim``), standard ZeRO accounting for bf16 mixed
precision: w Psi of bf16 weights (Psi / G at stage 3); gradients as DeepSpeed holds them
across the micro-batches of one optimizer step: w Psi at stages 0-1 (every micro-batch's
gradients are added in place into the full ``param.grad``, reduced once at the
accumulation boundary), w Psi / G at stages 2-3 (each micro-batch's gradients are reduced
as the backward produces them and added into the owned partition); 12 bytes of AdamW state
(fp32 master, m, v) per owned parameter (Psi at stage 0, Psi / G at stages 1-3). In fp32
the bytes are 4 + 4 + 8. At stage 0 in bf16 DeepSpeed's optimizer also accumulates the
gradients in an fp32 buffer (4 Psi) through the step. ``offload_optimizer`` moves the
optimizer states and the update (with an fp32 gradient partition and the update's
temporaries; from stage 2 the gradient partitions too) to CPU memory. ``fp32_grads``
counts the fp32 gradient partition of the update (below) as resident through the step, as
DeepSpeed's own estimators do.

One micro-batch's forward and backward (``activations``, ``loss``). Accumulation changes
none of the above: only one micro-batch's activations exist at a time, so it trades time
(A passes per step) for activation memory (a micro-batch A times smaller). What autograd
keeps after the LM's forward (:func:`saved_activation_bytes`), in elements times w:

- per layer without checkpointing, per token: 6 D for self-attention (LayerNorm input and
  output, Q, K, V, the attention output; memory-efficient attention keeps no S x S
  scores), 4 D for cross-attention (LayerNorm input and output, Q, the attention output),
  2 D + 2 F for the feed-forward (LayerNorm input and output, the GELU's input and output);
  plus 2 L D per window for the cross-attention keys and values over the text;
- per layer with checkpointing (per transformer layer, torch's non-reentrant checkpoint):
  only the layer's input, D per token;
- the output norm's input (D per token), the projected condition (L D per window, kept by
  every layer's cross-attention) and the text projection's input (L x 768 per window).

One micro-batch's own memory peaks at one of two moments (:func:`step_memory`):

1. the end of the forward, inside the loss (the last codebook's fused op): the saved
   activations plus the loss's buffers (:func:`loss_bytes`): the hidden states gathered per
   codebook (K copies of [N_k, D]), the gradient dh the fused op computes in its forward
   and keeps for the backward (K x [N_k, D]), the head gradients it keeps likewise
   (K x [V, D]), and the op's workspace (one [chunk, V] block of logits, plus what the
   backend adds: :func:`op_workspace_bytes`);
2. the backward of the last transformer layer: the saved activations plus the backward's
   working set: with checkpointing the layer recomputed (its saved tensors but its input,
   which is already kept), the gradients in flight (the residual stream's gradient takes
   the place of the freed output-norm input; the feed-forward's [t, F] gradient comes on
   top) and the fresh gradient of the largest weight before it is added to the
   accumulated one (max(D F, 3 D^2, V D) elements). The backward's start (the kept dh and
   head gradients plus the transformer output's [t, D] gradient) holds less than (1) and
   is counted with (2).

Without checkpointing (1) is the larger (for K >= 2); with checkpointing (2) usually is.
The ``activations`` and ``loss`` columns are the two parts at the peak: at (1) the saved
activations and the loss's buffers; at (2) the saved activations plus the working set, and
0 for the loss (its buffers are freed by then). Left out: the no-grad token statistics before
the op (1024-row blocks, freed before (1) and smaller than it) and per-row indices and
statistics (tens of bytes per row against 2 w D).
``benchmarks/plan_calibration.py`` measures both moments in a real step on the CPU (torch's
memory profiler, fp32, the op's torch backend): for MusicGen-small's width with 4 layers and
2 windows of 5 s, measured / predicted step peak 0.99 without checkpointing and 1.00 with
it, and 0.99 for the memory checkpointing saves; 0.99 and 1.00 for 2 layers and one 30 s
window. Cast to bf16 the forward's end comes out up to 10 % below the prediction there
(the torch backend's fp32 temporaries are counted generously).

The step's peak is the largest of these moments (``PlanRow.moments``), each on top of what
stays between steps (weights, gradients, AdamW states, the reduction bucket, the reserve,
the stop rule's copy): the forward's end and the backward as above, plus at stage 3 the
gathered weights, and in the backward the reduction's flat copy; at stages 0-1 the
accumulation boundary; and the optimizer update. The sizes DeepSpeed reads from its config
(``reduce_bucket_size``, ``stage3_max_live_parameters``, ``sub_group_size``) are the engine's
(DeepSpeed's defaults) unless ``zero_config`` gives others (:func:`zero_limits`).

``buckets``: DeepSpeed's gradient-reduction buffers. Stages 1-3 allocate a reduce bucket of
``reduce_bucket_size`` elements (5e8) in the gradient dtype and keep it through the step.
At stage 3 the end of the backward reduces it with ``reduce_scatter_coalesced``, which
first concatenates the bucket into one flat copy (w min(Psi, 5e8), backward moment). The
accumulation boundary, after the last backward (activations and loss freed), adds at
stage 0 the all-reduce's flattened bucket (w min(Psi, 5e8)) and at stage 1 the owned
gradient partition (w Psi / G).

``update``: the optimizer step after the last micro-batch (activations freed, stage-3
weights released). DeepSpeed's bf16 optimizers (stages 1-3) build an fp32 copy of the owned
gradient partition for it (4 bytes per owned parameter; at stage 3 one ``sub_group_size``
group at a time; stage 0 holds its fp32 buffer anyway), and the engine's torch AdamW makes temporaries over the elements it
updates at once: one fp32 tensor (sqrt(v), 4 bytes) in its multi-tensor update, which torch
uses on CUDA (two, 8 bytes, in the single-tensor update it uses on CPU tensors). DeepSpeed's
fused or CPU Adam would make none; the engine does not use them. With ``offload_optimizer``
all of it is host memory (``cpu``).

``other``: a fixed reserve (CUDA context, NCCL workspaces, allocator fragmentation); at
stage 3 during the forward and backward the gathered bf16 weights: DeepSpeed keeps gathered
parameters it will reuse (``stage3_max_reuse_distance`` 1e9) until more than
``stage3_max_live_parameters`` (1e9) are live, so w min(Psi, 1e9), and never less than the
layer in use, the one being prefetched and the K heads (which the fused op reads as
external parameters of the objective module); with ``stop_rule`` the copy of the fp32
master weights the membership-inference stop rule keeps for bisecting between two checks
(4 Psi / G at stages 1-3, where ZeRO partitions the master, 4 Psi at stage 0). The stop
rule's own measurement runs between steps (activations freed) and, at stage 3, gathers the
K heads while it runs: less than a training step's working set.

These terms were measured in ``benchmarks/scale_check.py`` (MusicGen-small, ZeRO-3 bf16 on
2 CPU ranks, ``device="cpu"``): the planner within 3 % of the measured memory at each
moment of the step (benchmarks/RESULTS.md, "scale"). ``device="cpu"`` gives what a CPU rank
holds: the single-tensor AdamW update, and only the written part of the reduction bucket
(at most w Psi) resident, where a GPU allocates the whole bucket.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from noencore.planner.shape import StepShape

GIB = 1024**3
T5_BASE_DIM = 768
T5_BASE_ENCODER_PARAMS = 109_628_544  # frozen and cached: reported, never resident
ADAMW_STATE_BYTES = {"bf16": 12, "fp32": 8}  # fp32 master + m + v / m + v
WEIGHT_BYTES = {"bf16": 2, "fp32": 4}
# DeepSpeed's defaults, in elements, which the engine's generated config keeps (tests check
# both): reduce_bucket_size (the gradient-reduction bucket of stages 1-3, and the stage-0
# all-reduce's), stage3_max_live_parameters (gathered parameters ZeRO-3 keeps between uses),
# sub_group_size (the ZeRO-3 optimizer updates its partition in groups of this many).
REDUCE_BUCKET_ELEMENTS = 500_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000
SUB_GROUP_ELEMENTS = 1_000_000_000
# Bytes per updated element of torch AdamW's temporaries (the engine's optimizer): the
# multi-tensor (foreach) update torch picks on CUDA makes one fp32 copy (sqrt(v), scaled in
# place); the single-tensor update it picks for CPU tensors makes two (sqrt(v) and its
# bias-corrected quotient). DeepSpeed's FusedAdam and CPU Adam would make none.
ADAMW_TEMP_BYTES = {"cuda": 4, "cpu": 8}
# Rows per block of logits of each backend of the fused op (noencore.ops.reference,
# kernels/ce_ascent.py) and the C++ backend's block size in bytes (noencore.ops.cpp); copied
# here so that planning imports no torch (tests check they agree).
OP_CHUNK_ROWS = {"torch": 1024, "triton": 8192}
CPP_CHUNK_BYTES = 16 << 20
DEFAULT_GLOBAL_BATCH = 64  # windows per optimizer step, all GPUs together

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
        """Steps S the transformer sees for a clip of ``seconds`` in training: the codec
        frames plus the delay pattern's initial special step (audiocraft's training, like
        the engine, keeps only the pattern's valid steps: the max delay's tail is dropped),
        plus (melody) the prepended chroma frames and text tokens."""
        frames = math.ceil(self.frame_rate * seconds)
        steps = frames + 1
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
    from omegaconf import OmegaConf

    from noencore.errors import UntrustedFileError
    from noencore.fileio import load_torch

    file = Path(path)
    if file.is_dir():
        file = file / "state_dict.bin"
    if not file.is_file():
        raise ValueError(f"{file}: no audiocraft LM checkpoint here (expected a folder with state_dict.bin)")
    try:
        pkg = load_torch(file, what="audiocraft LM checkpoint", mmap=True)
        cfg = OmegaConf.to_container(OmegaConf.create(pkg["xp.cfg"]), resolve=True)
        state = pkg["best_state"]
    except UntrustedFileError:
        raise
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



_MEMORY_UNITS = {"": 1, "g": 1, "m": 1 / 1024, "t": 1024}


def parse_memory(text: str | float) -> float:
    """GiB in ``text``: a number with an optional unit, e.g. ``"80GB"``, ``"80GiB"``,
    ``"80 G"``, ``"81920MiB"``, ``"0.5TB"``, or a bare number of GiB (``"80"``, ``80``).

    GB and GiB (MB and MiB, TB and TiB) both count in powers of 1024, as GPU memory is
    labelled: an "80GB" A100 or H100 holds 80 GiB (about 79 of them usable; the reserve
    covers the rest), which 80e9 bytes (74.5 GiB) would understate. Raises ValueError for
    anything else or a size that is not positive.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([gmt])(?:i?b)?)?\s*", str(text), re.IGNORECASE)
    value = float(match.group(1)) * _MEMORY_UNITS[(match.group(2) or "").lower()] if match else 0.0
    if not match or value <= 0:
        raise ValueError(f"GPU memory {text!r}: expected a positive size such as 80GB, 80GiB, 81920MiB "
                         "or a bare number of GiB (80)")
    return value


def accumulation_choices(batch: int, gpus: int) -> list[int]:
    """Accumulation steps A that split a global ``batch`` over ``gpus`` into whole
    micro-batches (B / (G A) an integer), ascending; empty when G does not divide B."""
    per_gpu, rest = divmod(batch, gpus)
    return [a for a in range(1, per_gpu + 1) if per_gpu % a == 0] if not rest else []


def split_batch(batch: int, gpus: int, accumulation: int = 1) -> int:
    """The micro-batch per GPU, B / (G A) windows, of a global ``batch`` B split over ``gpus``
    G and ``accumulation`` A micro-batches; ValueError naming the values when it is not whole."""
    if batch < 1 or gpus < 1 or accumulation < 1:
        raise ValueError(f"batch={batch}, gpus={gpus}, accumulation={accumulation}: all must be positive")
    shape = StepShape(batch, gpus, accumulation)
    if not shape.whole:
        choices = accumulation_choices(batch, gpus)
        hint = (f"accumulation steps that divide it: {', '.join(map(str, choices))}" if choices
                else f"choose a global batch that is a multiple of {gpus}")
        raise ValueError(f"global batch {batch} does not split into {gpus} GPU(s) x {accumulation} "
                         f"accumulation step(s): {batch} / ({gpus} x {accumulation}) is not a whole "
                         f"micro-batch; {hint}")
    return shape.micro_batch


def _layer_saved(arch: MusicGenArch, micro_batch: int, seq: int, cond_tokens: int) -> int:
    """Elements one transformer layer keeps for its backward pass (see the module
    docstring): (12 D + 2 F) per token with cross-attention, (8 D + 2 F) without, plus
    the cross-attention keys and values over the condition tokens."""
    d, f = arch.dim, arch.ffn_dim
    per_token = 6 * d + 2 * d + 2 * f + (4 * d if arch.cross_attention else 0)
    return micro_batch * seq * per_token + (micro_batch * cond_tokens * 2 * d if arch.cross_attention else 0)


def saved_activation_bytes(arch: MusicGenArch, micro_batch: int, seq: int, cond_tokens: int, *,
                           act_bytes: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps after the LM's forward, up to the hidden states before the heads.

    Without checkpointing every layer's :func:`_layer_saved` (the first layer's includes the
    embedding sum); with checkpointing (per layer) only each layer's input, b x S x D. Both:
    the output norm's input (b x S x D), the projected condition (b x L x D, kept by the
    cross-attention) and the text projection's input (b x L x text_dim). Parameters and the
    loss are not included. (Checked against the tensors autograd saves in the tests.)
    """
    tokens = micro_batch * seq
    per_layer = tokens * arch.dim if checkpointing else _layer_saved(arch, micro_batch, seq, cond_tokens)
    cond = micro_batch * cond_tokens * ((arch.dim if arch.cross_attention else 0) + arch.text_dim)
    return act_bytes * (arch.num_layers * per_layer + tokens * arch.dim + cond)


def backward_working_bytes(arch: MusicGenArch, micro_batch: int, seq: int, cond_tokens: int, *,
                           act_bytes: int, checkpointing: bool) -> int:
    """What the backward of the last transformer layer holds beyond the saved activations:
    with checkpointing the layer recomputed (all it saves but its input, already kept), the
    feed-forward's [t, F] gradient in flight (the residual stream's [t, D] gradient takes the
    place of the output norm's input, freed by then), and the fresh gradient of the largest
    weight before it is added to the accumulated one."""
    tokens = micro_batch * seq
    recomputed = _layer_saved(arch, micro_batch, seq, cond_tokens) - tokens * arch.dim if checkpointing else 0
    largest_weight = max(arch.dim * arch.ffn_dim, 3 * arch.dim * arch.dim, arch.card * arch.dim)
    return act_bytes * (recomputed + tokens * arch.ffn_dim + largest_weight)


def op_workspace_bytes(arch: MusicGenArch, rows: int, *, act_bytes: int,
                       backend: Literal["triton", "cpp", "torch"] = "triton", chunk_rows: int | None = None) -> int:
    """Scratch memory of one call of the fused op (one codebook, ``rows`` rows), by backend.

    ``triton`` (CUDA): a [chunk, V] block of logits in the input dtype (its gradient written
    in place), the chunk's partial head gradient [V, D] in the input dtype, and, for inputs
    narrower than fp32, that partial in fp32 plus an fp32 accumulator.
    ``cpp``: one [chunk, V] block in the input dtype (chunks of ``CPP_CHUNK_BYTES``, made
    equal), plus an fp32 [V, D] accumulator for bf16 inputs split into more than 4 chunks.
    ``torch`` (the reference): an fp32 [chunk, V] block, log-sum-exp's temporary of the same
    size and the fp32 [chunk, D] product before it is copied into dh; for inputs narrower
    than fp32 also fp32 copies of the weight and of the chunk's rows, and an fp32 accumulator.
    """
    v, d, w = arch.card, arch.dim, act_bytes
    narrow = w < 4
    if backend == "cpp":
        chunk = chunk_rows or max(64, CPP_CHUNK_BYTES // (v * w))
        n_chunks = max(1, math.ceil(rows / chunk))
        return math.ceil(rows / n_chunks) * v * w + (4 * v * d if narrow and n_chunks > 4 else 0)
    if backend not in OP_CHUNK_ROWS:
        raise ValueError(f"backend={backend!r}: choose 'triton', 'cpp' or 'torch'")
    block = min(chunk_rows or OP_CHUNK_ROWS[backend], rows)
    if backend == "triton":
        return block * v * w + v * d * w + (2 * 4 * v * d if narrow else 0)
    return 2 * 4 * block * v + 4 * block * d + (4 * (2 * v * d + block * d) if narrow else 0)


def loss_bytes(arch: MusicGenArch, micro_batch: int, frames: int, *, act_bytes: int,
               loss: Literal["fused", "materialized"] = "fused",
               backend: Literal["triton", "cpp", "torch"] = "triton", chunk_rows: int | None = None) -> int:
    """The loss's buffers at the end of the forward, over the K heads (N_k = b x T rows each).

    ``fused``: the hidden states gathered per codebook (K x [N_k, D]), the dh the op computes
    in its forward and keeps for the backward (K x [N_k, D]), the head gradients it keeps
    likewise (K x [V, D]), all in the activation dtype, plus one call's
    :func:`op_workspace_bytes`. ``materialized`` (the unfused baseline): all [b, K, T, V]
    logits in fp32 plus their gradient of the same size.
    """
    rows = micro_batch * frames
    if loss == "materialized":
        return 2 * 4 * arch.n_q * rows * arch.card
    if loss != "fused":
        raise ValueError(f"loss={loss!r}: choose 'fused' or 'materialized'")
    gathered = act_bytes * arch.n_q * rows * arch.dim
    return gathered + _fused_kept(arch, rows, act_bytes) + op_workspace_bytes(
        arch, rows, act_bytes=act_bytes, backend=backend, chunk_rows=chunk_rows)


def _fused_kept(arch: MusicGenArch, rows: int, act_bytes: int) -> int:
    """The gradients the fused op computes in its forward and keeps for the backward: dh
    (K x [rows, D]) and the head gradients (K x [V, D])."""
    return act_bytes * arch.n_q * (rows + arch.card) * arch.dim


@dataclass(frozen=True)
class StepMemory:
    """One micro-batch's forward and backward on one GPU, bytes: what autograd keeps from
    the LM's forward (``saved``), the loss's buffers at the end of the forward (``loss``)
    and the last layer's backward working set (``backward``)."""

    saved: int
    loss: int
    backward: int  # the larger of the backward's start and its last layer

    @property
    def forward_peak(self) -> int:
        return self.saved + self.loss

    @property
    def backward_peak(self) -> int:
        return self.saved + self.backward

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.backward_peak)

    def at_peak(self) -> tuple[int, int]:
        """(activations, loss) at the peak: (saved, loss) when the forward's end is the peak,
        (saved + backward, 0) when the backward is (the loss's buffers are freed by then)."""
        if self.forward_peak >= self.backward_peak:
            return self.saved, self.loss
        return self.backward_peak, 0


def step_memory(model: str | os.PathLike[str] | MusicGenArch, micro_batch: int, seconds: float, *,
                text_tokens: int = 64, checkpointing: bool = False, act_bytes: int = 2,
                loss: Literal["fused", "materialized"] = "fused",
                backend: Literal["triton", "cpp", "torch"] = "triton", chunk_rows: int | None = None) -> StepMemory:
    """:class:`StepMemory` of ``micro_batch`` windows of ``seconds`` (``text_tokens`` T5 tokens
    per caption, ``act_bytes`` per activation element: 2 in bf16, 4 in fp32)."""
    arch = get_arch(model)
    seq = arch.sequence_length(seconds, text_tokens)
    frames = math.ceil(arch.frame_rate * seconds)
    loss_mem = loss_bytes(arch, micro_batch, frames, act_bytes=act_bytes, loss=loss, backend=backend,
                          chunk_rows=chunk_rows)
    # The backward's start: the fused op's kept gradients and the transformer output's
    # [t, D] gradient, less than the forward's end, kept so that a measured backward peak
    # can be compared. (The materialized loss counts its logits' gradient in ``loss``.)
    start = 0
    if loss == "fused":
        start = _fused_kept(arch, micro_batch * frames, act_bytes) + act_bytes * micro_batch * seq * arch.dim
    return StepMemory(
        saved=saved_activation_bytes(arch, micro_batch, seq, text_tokens, act_bytes=act_bytes,
                                     checkpointing=checkpointing),
        loss=loss_mem,
        backward=max(start, backward_working_bytes(arch, micro_batch, seq, text_tokens, act_bytes=act_bytes,
                                                   checkpointing=checkpointing)),
    )


@dataclass(frozen=True)
class ZeroLimits:
    """The DeepSpeed sizes the planner reads, in elements (see :func:`zero_limits`)."""

    reduce_bucket: int = REDUCE_BUCKET_ELEMENTS
    max_live_parameters: int = MAX_LIVE_PARAMETERS
    sub_group: int = SUB_GROUP_ELEMENTS


def zero_limits(config: dict | None = None) -> ZeroLimits:
    """The bucket and live-parameter sizes of a DeepSpeed ``config`` (the whole config, as
    ``noencore.engine.zero.build_config`` returns it or a user passes it, or None for the
    engine's generated one): ``zero_optimization``'s ``reduce_bucket_size``,
    ``stage3_max_live_parameters`` and ``sub_group_size``, DeepSpeed's defaults where unset.
    ValueError, naming the key, for a value that is not a positive number."""
    zo = (config or {}).get("zero_optimization") or {}
    values = {}
    for field_name, key, default in (("reduce_bucket", "reduce_bucket_size", REDUCE_BUCKET_ELEMENTS),
                                     ("max_live_parameters", "stage3_max_live_parameters", MAX_LIVE_PARAMETERS),
                                     ("sub_group", "sub_group_size", SUB_GROUP_ELEMENTS)):
        raw = zo.get(key, default)
        try:
            value = int(float(raw))
        except (TypeError, ValueError):
            value = -1
        if value < (0 if key == "stage3_max_live_parameters" else 1):
            raise ValueError(f"DeepSpeed config: zero_optimization.{key}={raw!r} is not a positive number "
                             "of elements; set a number (e.g. 5e8) or remove the key for DeepSpeed's default")
        values[field_name] = value
    return ZeroLimits(**values)


@dataclass(frozen=True)
class _States:
    """Model states of one GPU, bytes: resident ``params``, ``grads``, ``optim``; the
    update's transient ``update``; host memory ``cpu`` (offload)."""

    params: int
    grads: int
    optim: int
    update: int
    cpu: int


def _model_states(arch: MusicGenArch, stage: int, part: int, shard: int, w: int, precision: str,
                  offloaded: bool, fp32_grads: bool, device: str, limits: ZeroLimits) -> _States:
    """Weights, gradients and AdamW states as DeepSpeed holds them at ``stage`` (see the
    module docstring), and what the optimizer update adds: the fp32 gradient partition the
    bf16 optimizers build for it (stages 1-2: the whole owned partition; stage 3: one
    sub-group at a time) and torch AdamW's temporaries over the elements updated at once."""
    n_params = arch.n_params()
    params = w * (shard if stage == 3 else n_params)
    grads = w * (shard if stage >= 2 else n_params)
    optim = ADAMW_STATE_BYTES[precision] * part
    bf16 = precision == "bf16"
    if bf16 and stage == 0:
        grads += 4 * n_params  # DeepSpeed's bf16 optimizer accumulates in an fp32 buffer
    at_once = min(part, limits.sub_group) if stage == 3 else part  # elements updated together
    if offloaded:
        # The update runs on the CPU: states, an fp32 gradient partition and the
        # single-tensor AdamW temporaries live there; from stage 2 the reduced gradient
        # partitions leave the GPU as well.
        cpu = optim + 4 * part + ADAMW_TEMP_BYTES["cpu"] * at_once
        return _States(params=params, grads=grads if stage == 1 else 0, optim=0, update=0, cpu=cpu)
    fp32_part = 4 * part if (fp32_grads and bf16 and stage >= 1) else 0
    update = (4 * at_once if (bf16 and stage >= 1 and not fp32_grads) else 0) + ADAMW_TEMP_BYTES[device] * at_once
    return _States(params=params, grads=grads + fp32_part, optim=optim, update=update, cpu=0)


def _bucket_bytes(stage: int, n_params: int, w: int, device: str, limits: ZeroLimits) -> int:
    """The gradient-reduction bucket stages 1-3 hold through the step: all of it on a GPU
    (allocated at once); on a CPU rank only the part gradients are written to is resident,
    at most every parameter's gradient."""
    if stage == 0:
        return 0
    elements = limits.reduce_bucket if device == "cuda" else min(n_params, limits.reduce_bucket)
    return w * elements


@dataclass(frozen=True)
class PlanRow:
    """One configuration and its memory per GPU (sizes in bytes; see the module docstring).

    The configuration: ZeRO ``stage``, ``offload_optimizer``, ``checkpointing``,
    ``micro_batch`` windows per GPU per forward/backward, ``accumulation`` micro-batches per
    optimizer step, ``gpus``, ``frames`` per window, ``precision``. Memory: ``params``,
    ``grads``, ``optim`` (model states), ``activations`` and ``loss`` (at the step's peak), ``update``
    (the optimizer update's fp32 gradient partition and AdamW temporaries, when the update
    is the peak), ``buckets`` (gradient reduction), ``other`` (reserve, the stop rule's copy,
    the stage-3 gathered weights when the forward or backward is the peak); ``cpu`` is host
    memory per rank for offloaded optimizer states. ``peak`` names the moment the columns
    describe; ``moments`` gives every moment's total (``between`` steps, the ``forward``'s
    end, the ``backward``, the stage-0/1 accumulation ``boundary``, the ``update``).
    """

    stage: int
    offload_optimizer: bool
    checkpointing: bool
    micro_batch: int
    accumulation: int
    gpus: int
    frames: int
    precision: str
    params: int
    grads: int
    optim: int
    activations: int
    loss: int
    buckets: int
    other: int
    cpu: int
    gpu_mem: int
    notes: tuple[str, ...] = field(default=())
    update: int = 0
    peak: str = "forward"
    moments: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    @property
    def total(self) -> int:
        return (self.params + self.grads + self.optim + self.activations + self.loss + self.update
                + self.buckets + self.other)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem

    @property
    def free(self) -> int:
        """GPU memory left (negative: missing)."""
        return self.gpu_mem - self.total

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step, all GPUs together (``unlearn``'s batch size)."""
        return self.micro_batch * self.gpus * self.accumulation

    def flags(self) -> str:
        """The ``noencore unlearn`` flags of this configuration."""
        return (f"--zero-stage {self.stage} --batch-size {self.global_batch} --accumulation {self.accumulation} "
                f"--frames {self.frames} --precision {self.precision}"
                + (" --checkpointing" if self.checkpointing else "")
                + (" --offload-optimizer" if self.offload_optimizer else ""))

    def command(self, model: str) -> str:
        """The launch command of this configuration for ``model`` (the data, method and run
        folder flags are the user's: placeholders in capitals)."""
        return (f"deepspeed --num_gpus {self.gpus} --module noencore unlearn --model {model} --shards SHARDS "
                f"--forget-ids IDS --method METHOD --out RUN {self.flags()}")


def plan_memory(
    model: str | os.PathLike[str] | MusicGenArch = "facebook/musicgen-large",
    *,
    gpus: int = 1,
    gpu_mem_gib: float = 80.0,
    micro_batch: int = 1,
    accumulation: int = 1,
    seconds: float = 30.0,
    checkpointing: bool = False,
    loss: Literal["fused", "materialized"] = "fused",
    backend: Literal["triton", "cpp", "torch"] = "triton",
    chunk_rows: int | None = None,
    offload_optimizer: bool = False,
    precision: Literal["bf16", "fp32"] = "bf16",
    text_tokens: int = 64,
    reserve_gib: float = 2.0,
    stop_rule: bool = False,
    fp32_grads: bool = False,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    device: Literal["cuda", "cpu"] = "cuda",
    zero_config: dict | None = None,
) -> list[PlanRow]:
    """Per-GPU memory of unlearning ``model`` at each ZeRO stage, one :class:`PlanRow` each.

    Args:
        model: hub id or short name (see :data:`ARCHITECTURES`), a local audiocraft
            checkpoint folder, or a :class:`MusicGenArch`.
        gpus: data-parallel GPUs G (ZeRO partitions over them).
        gpu_mem_gib: memory of one GPU, GiB.
        micro_batch: windows per GPU per forward/backward.
        accumulation: micro-batches per optimizer step (recorded in the rows: memory does
            not depend on it, the global batch does).
        seconds: window length; T = ceil(50 x seconds) frames, S = T + 1 steps (+ prepended
            conditions).
        checkpointing: activation checkpointing per transformer layer.
        loss: ``fused`` (noencore's op) or ``materialized`` (full logits, the baseline).
        backend: the fused op's backend (``triton`` on GPUs; ``cpp`` and ``torch`` on CPU).
        chunk_rows: rows per block of logits (default: the backend's).
        offload_optimizer: optimizer states on CPU (ZeRO stages 1-3).
        precision: ``bf16`` mixed precision (fp32 master weights) or plain ``fp32``.
        text_tokens: T5 tokens per caption (cross-attention keys, or prepended for melody).
        reserve_gib: fixed per-GPU reserve, GiB (CUDA context, NCCL, fragmentation).
        stop_rule: the membership-inference stop rule's copy of the fp32 master weights.
        fp32_grads: count the fp32 gradient partition DeepSpeed's bf16 optimizers build for
            the update (4 bytes per owned parameter) as resident through the whole step, as
            DeepSpeed's own estimators do (18 bytes per parameter instead of 16 at stages
            2-3); by default it is counted at the update only, where it exists.
        stages: ZeRO stages to plan.
        device: ``cuda`` (GPU memory, the planner's meaning) or ``cpu`` (a CPU rank's
            resident memory, as ``benchmarks/scale_check.py`` measures it: torch AdamW's
            single-tensor update, two fp32 temporaries per element instead of one, and only
            the written part of the reduction bucket resident; pass ``reserve_gib=0``).
        zero_config: the DeepSpeed config the run uses (see :func:`zero_limits`; None: the
            engine's generated one, DeepSpeed's default bucket and live-parameter sizes).
    """
    arch = get_arch(model)
    if min(gpus, micro_batch, accumulation, text_tokens) < 1 or seconds <= 0 or gpu_mem_gib <= 0 \
            or (chunk_rows is not None and chunk_rows < 1):
        raise ValueError(f"gpus={gpus}, micro_batch={micro_batch}, accumulation={accumulation}, "
                         f"seconds={seconds}, gpu_mem_gib={gpu_mem_gib}, text_tokens={text_tokens}, "
                         f"chunk_rows={chunk_rows}: all must be positive")
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision={precision!r}: choose 'bf16' or 'fp32'")
    bad = [s for s in stages if s not in (0, 1, 2, 3)]
    if bad:
        raise ValueError(f"ZeRO stages {bad} do not exist: choose among 0, 1, 2, 3")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: choose 'cuda' (GPU memory) or 'cpu' (a CPU rank's)")
    limits = zero_limits(zero_config)
    n_params = arch.n_params()
    shard = math.ceil(n_params / gpus)  # DeepSpeed pads partitions to equal size
    w = WEIGHT_BYTES[precision]
    step = step_memory(arch, micro_batch, seconds, text_tokens=text_tokens, checkpointing=checkpointing,
                       act_bytes=w, loss=loss, backend=backend, chunk_rows=chunk_rows)
    reserve = int(reserve_gib * GIB)
    rows = []
    for stage in stages:
        notes: list[str] = []
        part = shard if stage >= 1 else n_params  # what this GPU owns of the optimizer's data
        offloaded = offload_optimizer and stage > 0
        if offload_optimizer and stage == 0:
            notes.append("optimizer offload needs ZeRO >= 1")
        states = _model_states(arch, stage, part, shard, w, precision, offloaded, fp32_grads, device, limits)
        buckets = _bucket_bytes(stage, n_params, w, device, limits)
        stop_copy = 4 * part if stop_rule else 0
        base = states.params + states.grads + states.optim + buckets + reserve + stop_copy
        # what each moment of the step holds beyond ``base`` (see the module docstring):
        # (activations, loss, update, extra bucket bytes, extra other bytes)
        gathered = w * max(2 * arch.layer_params() + arch.n_q * arch.card * arch.dim,
                           min(n_params, limits.max_live_parameters)) if stage == 3 else 0
        reduce_copy = w * min(n_params, limits.reduce_bucket) if stage == 3 else 0
        moments = {
            "between": (0, 0, 0, 0, 0),
            "forward": (step.saved, step.loss, 0, 0, gathered),
            "backward": (step.backward_peak, 0, 0, reduce_copy, gathered),
            "update": (0, 0, states.update, 0, 0),
        }
        if stage == 0:  # the all-reduce's flattened bucket, after the last backward
            moments["boundary"] = (0, 0, 0, w * min(n_params, limits.reduce_bucket), 0)
        elif stage == 1:  # the owned gradient partition the reduction fills
            moments["boundary"] = (0, 0, 0, w * shard, 0)
        sizes = {k: base + sum(v) for k, v in moments.items()}
        peak = max(sizes, key=sizes.get)
        acts, loss_mem, update, extra_bucket, extra_other = moments[peak]
        rows.append(PlanRow(
            stage=stage, offload_optimizer=offloaded, checkpointing=checkpointing,
            micro_batch=micro_batch, accumulation=accumulation, gpus=gpus,
            frames=math.ceil(arch.frame_rate * seconds), precision=precision, params=states.params,
            grads=states.grads, optim=states.optim, activations=acts, loss=loss_mem, update=update,
            buckets=buckets + extra_bucket, other=reserve + stop_copy + extra_other, cpu=states.cpu,
            gpu_mem=int(gpu_mem_gib * GIB), notes=tuple(notes), peak=peak, moments=sizes,
        ))
    return rows


def recommend(model: str | os.PathLike[str] | MusicGenArch = "facebook/musicgen-large", gpus: int = 1,
              gpu_mem_gib: float = 80.0, batch: int = DEFAULT_GLOBAL_BATCH, seconds: float = 30.0, *,
              stages: tuple[int, ...] = (0, 1, 2, 3), offload: bool | None = None, **options) -> list[PlanRow]:
    """The configurations that fit a global ``batch`` of windows of ``seconds`` on ``gpus``
    GPUs of ``gpu_mem_gib`` GiB each, fastest first.

    Searched: ZeRO ``stages``, checkpointing off and on, and every accumulation A that splits
    ``batch`` into whole micro-batches of B / (G A) windows; optimizer offload only when no
    configuration fits without it (``offload=None``), always (True) or never (False). For
    each stage and checkpointing setting only the fewest accumulation steps that fit are
    kept (more steps save memory no longer needed, at the cost of time), and a configuration
    is left out when a faster one needs no more memory: down the list each one is slower
    and needs less memory than all above it.

    Rank (expected speed): no offload first (the CPU update and the transfers each step are
    the slowest part), then no checkpointing (recomputing the forward costs about a third of
    the step's compute), then the fewest accumulation steps (each is one more pass of
    smaller kernels, and at stages 2-3 one more gradient reduction, at stage 3 one more
    gather of the weights), then the lowest stage (the least communication).

    ``options`` as for :func:`plan_memory` (precision, text_tokens, reserve_gib, stop_rule,
    loss, backend, ...). Raises ValueError when ``gpus`` does not divide ``batch``.
    """
    arch = get_arch(model)  # once: a local checkpoint is read here, not per configuration
    choices = accumulation_choices(batch, gpus) if batch >= 1 and gpus >= 1 else []
    if not choices:
        split_batch(batch, gpus)  # raises, naming the values
    per_gpu = batch // gpus
    rows: list[PlanRow] = []
    for offloaded in ((False, True) if offload is None else (offload,)):
        for checkpointing in (False, True):
            for stage in stages:
                if offloaded and stage == 0:
                    continue  # DeepSpeed offloads from ZeRO-1 on
                for acc in choices:
                    row = plan_memory(arch, gpus=gpus, gpu_mem_gib=gpu_mem_gib, micro_batch=per_gpu // acc,
                                      accumulation=acc, seconds=seconds, checkpointing=checkpointing,
                                      offload_optimizer=offloaded, stages=(stage,), **options)[0]
                    if row.fits:
                        rows.append(row)
                        break
        if rows:
            break
    rows.sort(key=lambda r: (r.offload_optimizer, r.checkpointing, r.accumulation, r.stage))
    # A configuration ranked slower that needs no less memory than a faster one is no option.
    return [r for i, r in enumerate(rows) if all(r.total < faster.total for faster in rows[:i])]


def max_micro_batch(model: str | os.PathLike[str] | MusicGenArch, stage: int, *, limit: int = 4096,
                    **kwargs) -> int:
    """Largest micro-batch per GPU that fits at ``stage`` (0 when even 1 does not), up to
    ``limit``; ``kwargs`` as for :func:`plan_memory` (memory grows with the micro-batch,
    so a doubling then a bisection finds it)."""
    def fits(b: int) -> bool:
        return plan_memory(model, micro_batch=b, stages=(stage,), **kwargs)[0].fits

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


def lowest_fitting(rows: list[PlanRow]) -> PlanRow | None:
    """The lowest stage that fits (least communication), preferring no offload; or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: (r.offload_optimizer, r.stage), default=None)


_MEMORY_COLUMNS = ("params", "grads", "optim", "activ", "loss", "update", "bucket", "other", "total")


def _memory_cells(r: PlanRow) -> str:
    """The GiB columns of one row, in the order of ``_MEMORY_COLUMNS``."""
    values = (r.params, r.grads, r.optim, r.activations, r.loss, r.update, r.buckets, r.other, r.total)
    return " ".join(f"{v / GIB:7.2f}" for v in values)


def _header(lead: str) -> list[str]:
    head = lead + " ".join(f"{c:>7}" for c in _MEMORY_COLUMNS)
    return [head, "-" * len(head)]


def format_plan_table(rows: list[PlanRow]) -> str:
    """A fixed-width text table, GiB per GPU, one line per stage, and the lowest stage that fits."""
    lines = _header(f"{'ZeRO':>4} {'offload':>7} ")
    lines[0] += f" {'fits':>4}"
    lines[1] += "-----"
    for r in rows:
        lines.append(f"{r.stage:>4} {'cpu' if r.offload_optimizer else '-':>7} {_memory_cells(r)} "
                     f"{'yes' if r.fits else 'no':>4}" + (f"  ({'; '.join(r.notes)})" if r.notes else ""))
    best = lowest_fitting(rows)
    if best is None:
        lines.append("recommended: none fits; try --checkpointing, a smaller --micro-batch or --seconds, "
                     "--offload-optimizer, or more GPUs")
    else:
        how = (" with optimizer offload" if best.offload_optimizer
               else " (nothing partitioned: one process or plain data parallel)" if best.stage == 0 else "")
        lines.append(f"recommended: ZeRO-{best.stage}{how}, {best.total / GIB:.1f} of "
                     f"{best.gpu_mem / GIB:.0f} GiB per GPU ({best.free / GIB:.1f} GiB free)")
    return "\n".join(lines)


def format_recommendations(rows: list[PlanRow]) -> str:
    """The ranked configurations of :func:`recommend` as a fixed-width table (GiB per GPU),
    followed by the ``noencore unlearn`` flags of each."""
    lines = _header(f"{'#':>2} {'ZeRO':>4} {'offload':>7} {'ckpt':>4} {'micro':>5} {'accum':>5} ")
    lines[0] += f" {'free':>7}"
    lines[1] += "-" * 8
    for i, r in enumerate(rows, 1):
        lines.append(f"{i:>2} {r.stage:>4} {'cpu' if r.offload_optimizer else '-':>7} "
                     f"{'yes' if r.checkpointing else 'no':>4} {r.micro_batch:>5} {r.accumulation:>5} "
                     f"{_memory_cells(r)} {r.free / GIB:7.2f}")
    lines.append("flags:")
    lines += [f"{i:>2} {r.flags()}" for i, r in enumerate(rows, 1)]
    return "\n".join(lines)
