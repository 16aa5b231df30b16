"""The transformer block as one function of tensors, compiled once for every layer.

audiocraft's ``StreamingTransformerLayer`` carries what generation needs (streaming
state, xFormers' ``LowerTriangularMask`` on the memory-efficient path, a profiler probe):
``torch.compile`` breaks its graph there (every released MusicGen), and compiling each
layer module compiles each layer. ``block_math`` is the same training-time computation
(pre-norm self-attention, cross-attention to the text condition, feed-forward, optional
layer scale) written as one function of the layer's tensors: torch's scaled-dot-product
attention with ``is_causal`` for the self-attention (flash / memory-efficient kernels on
GPU, the fused CPU kernel here; the attention weights are never materialised) and for the
cross-attention (no mask, as audiocraft: the condition's padding is zeros, not masked).
Compiled, it is one graph every layer reuses (the parameters are its arguments), so a
24-layer model compiles once: "regional" compilation.

``install(lm, compile=...)`` swaps each layer's ``forward`` for a call of that function
(the module, its parameters and its hooks stay: DeepSpeed ZeRO-3 gathers a leaf layer's
parameters at the layer's own pre-forward hook, and activation checkpointing wraps the
layer call as before); ``FusedBlocks.restore`` puts audiocraft's forward back, for
generation and saving. ``unsupported`` names a layer setting the function does not
compute (rotary embeddings, QK norm, grouped KV, a limited past context, gated
activations, non-LayerNorm norms), which is refused rather than computed differently.

A failed compile (``warm_up``) is named in a warning and the run continues with the
same function eager. Compiled code is cached by torch (``TORCHINDUCTOR_CACHE_DIR``; the
Makefile keeps it in ``.cache/inductor``), so a second run skips most of the compile.
``NOENCORE_COMPILE_BACKEND`` picks torch.compile's backend (default ``inductor``;
``aot_eager`` traces without generating code, for quick checks of the mechanics).
"""
from __future__ import annotations

import itertools
import os
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from noencore.errors import UsageError


def _attention(x: torch.Tensor, src: torch.Tensor | None, in_w: torch.Tensor,
               in_b: torch.Tensor | None, out_w: torch.Tensor, out_b: torch.Tensor | None,
               heads: int, causal: bool, p: float, as_float32: bool) -> torch.Tensor:
    """Multi-head attention of ``x`` [B, T, D] to itself (``src`` None, causal) or to
    ``src`` [B, S, D]: in_w [3D, D] packs the q, k, v projections (torch's and
    audiocraft's layout), heads contiguous in each."""
    b, t, d = x.shape
    if src is None:
        q, k, v = F.linear(x, in_w, in_b).view(b, t, 3, heads, d // heads).unbind(2)
    else:
        bq, bk, bv = (None, None, None) if in_b is None else in_b.chunk(3)
        wq, wk, wv = in_w.chunk(3)
        s = src.shape[1]
        q = F.linear(x, wq, bq).view(b, t, heads, d // heads)
        k = F.linear(src, wk, bk).view(b, s, heads, d // heads)
        v = F.linear(src, wv, bv).view(b, s, heads, d // heads)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, d]
    if as_float32:
        q, k, v = q.float(), k.float(), v.float()
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal)
    y = y.to(x.dtype).transpose(1, 2).reshape(b, t, d)
    return F.linear(y, out_w, out_b)


def block_math(x: torch.Tensor, cross: torch.Tensor | None, w: dict[str, Any],
               c: dict[str, Any]) -> torch.Tensor:
    """One pre-norm transformer block: ``w`` the layer's tensors (``layer_tensors``), ``c``
    its constants (``layer_constants``); x [B, T, D] -> [B, T, D]."""
    def scale(name: str, y: torch.Tensor) -> torch.Tensor:
        return y if w[name] is None else w[name] * y

    def norm(name: str, y: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(y, (y.shape[-1],), w[name + ".w"], w[name + ".b"], c["eps"])

    drop, train = c["dropout"], c["training"]
    h = _attention(norm("norm1", x), None, w["sa.in_w"], w["sa.in_b"], w["sa.out_w"],
                   w["sa.out_b"], c["heads"], True, c["attn_dropout"] if train else 0.0,
                   c["as_float32"])
    x = x + scale("ls1", F.dropout(h, drop, train))
    if cross is not None:
        h = _attention(norm("norm_cross", x), cross, w["ca.in_w"], w["ca.in_b"],
                       w["ca.out_w"], w["ca.out_b"], c["heads"], False,
                       c["attn_dropout"] if train else 0.0, c["as_float32"])
        x = x + scale("ls_cross", F.dropout(h, drop, train))
    h = c["activation"](F.linear(norm("norm2", x), w["ff1.w"], w["ff1.b"]))
    h = F.linear(F.dropout(h, drop, train), w["ff2.w"], w["ff2.b"])
    return x + scale("ls2", F.dropout(h, drop, train))


def _attn_tensors(attn: nn.Module) -> tuple[Any, ...]:
    """(in_w, in_b, out_w, out_b) of audiocraft's attention, custom or torch's MHA."""
    m = attn if attn.custom else attn.mha
    return m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias


def _scale(ls: nn.Module) -> torch.Tensor | None:
    return None if isinstance(ls, nn.Identity) else ls.scale


def layer_tensors(layer: nn.Module) -> dict[str, Any]:
    """The layer's parameters by the names ``block_math`` reads (read at every call: under
    ZeRO-3 they are the gathered tensors; under LoRA the parametrized ones)."""
    w: dict[str, Any] = {"norm1.w": layer.norm1.weight, "norm1.b": layer.norm1.bias,
                         "norm2.w": layer.norm2.weight, "norm2.b": layer.norm2.bias,
                         "ff1.w": layer.linear1.weight, "ff1.b": layer.linear1.bias,
                         "ff2.w": layer.linear2.weight, "ff2.b": layer.linear2.bias,
                         "ls1": _scale(layer.layer_scale_1), "ls2": _scale(layer.layer_scale_2)}
    w["sa.in_w"], w["sa.in_b"], w["sa.out_w"], w["sa.out_b"] = _attn_tensors(layer.self_attn)
    if layer.cross_attention is not None:
        w["ca.in_w"], w["ca.in_b"], w["ca.out_w"], w["ca.out_b"] = \
            _attn_tensors(layer.cross_attention)
        w["norm_cross.w"], w["norm_cross.b"] = layer.norm_cross.weight, layer.norm_cross.bias
        w["ls_cross"] = _scale(layer.layer_scale_cross)
    return w


def layer_constants(layer: nn.Module) -> dict[str, Any]:
    return {"heads": layer.self_attn.num_heads, "eps": layer.norm1.eps,
            "dropout": float(layer.dropout1.p), "attn_dropout": float(layer.self_attn.dropout),
            "as_float32": bool(layer.self_attn.attention_as_float32),
            "activation": layer.activation, "training": layer.training}


def unsupported(layer: nn.Module) -> str | None:
    """What in ``layer`` ``block_math`` does not compute, or None."""
    sa, ca = layer.self_attn, layer.cross_attention
    checks = [
        (not getattr(layer, "norm_first", False), "post-norm blocks (norm_first=False)"),
        (not sa.causal, "non-causal self-attention"),
        (sa.past_context is not None, "a limited past context (past_context)"),
        (sa.rope is not None, "rotary position embeddings (positional_embedding rope)"),
        (bool(getattr(sa, "qk_layer_norm", False)), "QK layer norm (qk_layer_norm)"),
        (getattr(sa, "kv_repeat", 1) != 1, "grouped key/value heads (kv_repeat > 1)"),
        (ca is not None and bool(getattr(ca, "qk_layer_norm", False)),
         "QK layer norm in cross-attention (qk_layer_norm_cross)"),
        (isinstance(layer.activation, nn.Module), f"the gated activation "
                                                  f"{type(layer.activation).__name__}"),
        (any(not isinstance(n, nn.LayerNorm) for n in
             (layer.norm1, layer.norm2, getattr(layer, "norm_cross", layer.norm1))),
         "a norm other than LayerNorm"),
        (isinstance(getattr(layer.layer_scale_1, "channel_last", True), bool)
         and not getattr(layer.layer_scale_1, "channel_last", True), "channel-first layer scale"),
    ]
    found = [what for bad, what in checks if bad]
    return ", ".join(found) or None


_COMPILED: dict[str, Callable] = {}


def compile_backend(backend: str | None = None) -> str:
    """``backend``, else ``NOENCORE_COMPILE_BACKEND``, else "inductor"."""
    return backend or os.environ.get("NOENCORE_COMPILE_BACKEND", "inductor")


def compiled_math(backend: str | None = None) -> Callable:
    """``block_math`` under ``torch.compile`` (one per backend per process)."""
    backend = compile_backend(backend)
    if backend not in _COMPILED:
        _COMPILED[backend] = torch.compile(block_math, backend=backend)
    return _COMPILED[backend]


def _fused_forward(self: nn.Module, src: torch.Tensor, src_mask: Any = None,
                   src_key_padding_mask: Any = None, cross_attention_src: Any = None,
                   **kw: Any) -> torch.Tensor:
    """The layer's forward while installed (``install``): the block function."""
    if src_mask is not None or src_key_padding_mask is not None or kw:
        raise UsageError("the fused transformer block takes no attention masks (the LM "
                         "never passes any in training); restore audiocraft's forward first")
    if self.self_attn._is_streaming:
        raise UsageError("the fused transformer block does not stream: restore audiocraft's "
                         "forward (FusedBlocks.restore) before generating")
    return self._noencore_math(src, cross_attention_src, layer_tensors(self),
                               layer_constants(self))


@dataclass
class FusedBlocks:
    """What ``install`` did: the layers it swapped, whether the function is compiled, the
    backend, the warm-up's compile seconds and, after a failed compile, why."""

    layers: list[nn.Module]
    compiled: bool
    backend: str = ""
    compile_s: float | None = None
    failed: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "backend": self.backend or None,
                "compile_s": self.compile_s, "compile_failed": self.failed,
                "layers": len(self.layers)}

    def use(self, fn: Callable) -> None:
        for layer in self.layers:
            layer._noencore_math = fn

    def warm_up(self, x: torch.Tensor, cross: torch.Tensor | None, *,
                single_row: bool = False) -> None:
        """Compile now, forward and backward, on stand-ins of the training shapes (the
        layers' parameter shapes, ``x`` [B, S, D] and ``cross`` [B, L, D]; batch, sequence and
        text length dynamic): the time is reported as ``compile_s``, apart from the steps'. A
        failure is named in a warning, and every layer goes on with the function eager.
        ``single_row``: micro-batches of one row (a size-1 batch gets a graph of its own)."""
        if not self.compiled:
            return
        # one layer of each kind the run has (trained or frozen: their graphs differ)
        kinds = {tuple(p.requires_grad for p in layer.parameters()): layer
                 for layer in self.layers}
        start = time.perf_counter()
        try:
            for layer, rows in itertools.product(kinds.values(),
                                                 (x.shape[0], 1) if single_row else (x.shape[0],)):
                self._warm_up_layer(layer, x[:rows], None if cross is None else cross[:rows])
        except Exception as exc:  # noqa: BLE001 - named below, and the run goes on eager
            self.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            self.compiled = False
            self.use(block_math)
            warnings.warn(f"compiling the transformer block ({self.backend}) failed: "
                          f"{self.failed}; the run continues with the same block eager",
                          stacklevel=2)
            return
        self.compile_s = time.perf_counter() - start

    @staticmethod
    def _warm_up_layer(layer: nn.Module, x: torch.Tensor, cross: torch.Tensor | None) -> None:
        """The graphs of one layer kind: the no-grad one (scoring, references) and, for a
        trained layer, the training step's (the input and, where the text projection
        trains, the condition carry gradients)."""
        w = {k: None if v is None else _stand_in(v) for k, v in layer_tensors(layer).items()}
        with torch.no_grad():
            layer._noencore_math(_dynamic(x.detach()), _dynamic(_detached(cross)), w,
                                 layer_constants(layer))
        if any(p.requires_grad for p in layer.parameters()):
            xs = _dynamic(x.detach().clone().requires_grad_(True))
            cs = _dynamic(_detached(cross, cross is not None and cross.requires_grad))
            layer._noencore_math(xs, cs, w, layer_constants(layer)).float().sum().backward()

    def restore(self) -> None:
        """audiocraft's forward back on every layer."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_noencore_math", None)
        self.layers = []


def _dynamic(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` [B, S or L, D] with its batch and length marked dynamic (any batch size,
    sequence length or text length reuses the graph; a size-1 dimension stays specialised)."""
    for dim in (0, 1) if t is not None else ():
        if t.shape[dim] > 1:
            torch._dynamo.mark_dynamic(t, dim)
    return t


def _detached(t: torch.Tensor | None, requires_grad: bool = False) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(requires_grad)


def _stand_in(p: torch.Tensor) -> torch.Tensor:
    """A parameter like ``p`` (its full shape under ZeRO-3, ``ds_shape``): of the same type,
    since the compiled graph's guards check the type and a plain tensor would make the
    first step compile again."""
    shape = tuple(getattr(p, "ds_shape", p.shape))
    return nn.Parameter(torch.randn(shape, device=p.device, dtype=p.dtype),
                        requires_grad=p.requires_grad)


def warm_up_inputs(lm: nn.Module, batch: int, frames: int, device: Any, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stand-ins of a training micro-batch's transformer input [B, S, D] (S: ``frames``
    under the delay pattern) and text condition [B, 8, D]."""
    from noencore.models.adapter import pattern_steps

    steps = pattern_steps(lm, frames)
    dim = lm.transformer.layers[0].norm1.normalized_shape[0]
    b = max(2, batch)  # a size-1 batch would be specialised, and recompiled for 2
    x = torch.randn(b, steps, dim, device=device, dtype=dtype)
    cross = None
    if lm.transformer.layers[0].cross_attention is not None:
        # as the training step's condition: it carries gradients where the text projection
        # trains
        trains = any(p.requires_grad for p in lm.condition_provider.parameters())
        cross = torch.randn(b, 8, dim, device=device, dtype=dtype).requires_grad_(trains)
    return x, cross


def install(lm: nn.Module, *, compile: bool, backend: str | None = None) -> FusedBlocks:
    """Every transformer layer of ``lm`` computes through ``block_math`` (compiled once,
    with ``compile``); refused, naming the setting, for a layer it does not compute."""
    layers = list(lm.transformer.layers)
    for i, layer in enumerate(layers):
        why = unsupported(layer)
        if why is not None:
            raise UsageError(f"the fused transformer block (--compile) does not compute "
                             f"layer {i}'s {why}; train without --compile")
    backend = compile_backend(backend) if compile else ""
    fn = compiled_math(backend) if compile else block_math
    blocks = FusedBlocks(layers, compile, backend)
    for layer in layers:
        layer.forward = types.MethodType(_fused_forward, layer)
    blocks.use(fn)
    return blocks
