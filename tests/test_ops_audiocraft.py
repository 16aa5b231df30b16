"""The op gives audiocraft's own MusicGen loss and gradients (tiny random LMModel).

The reference is MusicGenSolver._compute_cross_entropy written out: per-codebook
F.cross_entropy over the delay pattern's valid positions, averaged over K.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import noencore.ops as ops

audiocraft = pytest.importorskip("audiocraft")


def _tiny_lm(device: torch.device, card: int = 2048, dim: int = 32):
    from audiocraft.models.builders import get_lm_model
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({
        "lm_model": "transformer_lm", "device": str(device), "dtype": "float32",
        "dataset": {"segment_duration": 1.0},
        "transformer_lm": {"n_q": 4, "card": card, "dim": dim, "num_heads": 2,
                           "num_layers": 2, "hidden_scale": 2, "dropout": 0.0,
                           "bias_proj": False, "norm_first": True, "causal": True,
                           "custom": False, "cross_attention": False},
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": [0, 1, 2, 3]}},
        "conditioners": {"description": {"model": "lut", "lut": {
            "n_bins": 16, "dim": dim, "tokenizer": "noop"}}},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1,
                  "sum": [], "prepend": ["description"], "cross": [], "input_interpolate": []},
        "attribute_dropout": {},
        "classifier_free_guidance": {"training_dropout": 0.0, "inference_coef": 3.0},
    })
    torch.manual_seed(0)
    return get_lm_model(cfg).train()


def _solver_cross_entropy(logits, targets, mask):
    """MusicGenSolver._compute_cross_entropy, written out: [B, K, T, card] -> scalar."""
    _, k_total, _ = targets.shape
    ce = torch.zeros([], device=logits.device)
    for k in range(k_total):
        logits_k = logits[:, k, ...].contiguous().view(-1, logits.size(-1))
        targets_k = targets[:, k, ...].contiguous().view(-1)
        mask_k = mask[:, k, ...].contiguous().view(-1)
        ce = ce + F.cross_entropy(logits_k[mask_k], targets_k[mask_k])
    return ce / k_total


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_matches_musicgen_solver_loss_and_grads(backend, device):
    if backend == "cpp" and not ops.cpp_available():
        pytest.skip("C++ extension not built")
    if backend == "triton" and not ops.triton_available():
        pytest.skip("triton unavailable")
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = _tiny_lm(device)
    b, k_total, t = 2, 4, 12
    codes = torch.randint(0, lm.card, (b, k_total, t), device=device)
    conditions = [ConditioningAttributes(text={"description": str(i)}) for i in range(b)]

    captured = {}
    hook = lm.linears[0].register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("hidden", args[0]))  # [B, S, D] before heads
    out = lm.compute_predictions(codes, conditions)
    hook.remove()
    ref = _solver_cross_entropy(out.logits, codes, out.mask)
    params = [p for p in lm.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)

    # Hidden states moved from the pattern's sequence steps to the codes' time steps with
    # audiocraft's own pattern code (what it does to the logits), then one op per head.
    pattern = lm.pattern_provider.get_pattern(t)
    seq = pattern.build_pattern_sequence(codes, lm.special_token_id,
                                         keep_only_valid_steps=True)[0]
    hidden = captured["hidden"][:, -seq.shape[-1]:]  # [B, S, D], prepended condition dropped
    per_k = hidden.permute(0, 2, 1)[:, :, None, :].expand(-1, -1, k_total, -1)  # [B, D, K, S]
    h_bkt, _, mask = pattern.revert_pattern_logits(per_k, 0.0, keep_only_valid_steps=True)
    h_bkt = h_bkt.permute(0, 2, 3, 1)                            # [B, K, T, D]
    mask = mask[None].expand(b, -1, -1)
    assert torch.equal(mask, out.mask)
    total = 0.0
    for k in range(k_total):
        targets = torch.where(mask[:, k], codes[:, k], torch.full_like(codes[:, k], -100))
        total = total + ops.linear_ce_ascent(h_bkt[:, k].reshape(-1, hidden.shape[-1]),
                                             lm.linears[k].weight, targets.reshape(-1),
                                             backend=backend)
    ours = total / k_total
    our_grads = torch.autograd.grad(ours, params, allow_unused=True)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    checked = 0
    for p, g_ref, g in zip(params, ref_grads, our_grads):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
            continue
        scale = g_ref.abs().max().clamp_min(1e-12)
        assert float((g - g_ref).abs().max() / scale) < 1e-4, p.shape
        checked += 1
    assert checked >= 10  # heads, attention, embeddings and the condition table all compared
