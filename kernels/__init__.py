"""Triton kernels, installed as ``noencore.kernels`` (import triton only when used)."""
