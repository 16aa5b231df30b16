"""Batched evaluation: token metrics, membership inference, CLAP, FAD, reports."""
