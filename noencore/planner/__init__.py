"""The memory planner, beside the engine: which ZeRO stage, micro-batch, accumulation and
activation checkpointing fit unlearning a MusicGen model on G GPUs (``noencore plan``).

    shape.py    ``StepShape``: a global batch over ranks and micro-batches (the engine's too)
    memory.py   the LM's architecture (``MusicGenArch``), one training step's memory per
                GPU (``step_memory``, ``plan_memory``) and the recommendations

It imports no torch and nothing of the engine: it models the step the engine runs (the
engine takes its ``StepShape``), and tests check the two agree.
"""
from __future__ import annotations

from noencore.planner.memory import (
    ADAMW_STATE_BYTES,
    ADAMW_TEMP_BYTES,
    ARCHITECTURES,
    CPP_CHUNK_BYTES,
    DEFAULT_GLOBAL_BATCH,
    GIB,
    MAX_LIVE_PARAMETERS,
    OP_CHUNK_ROWS,
    REDUCE_BUCKET_ELEMENTS,
    SUB_GROUP_ELEMENTS,
    T5_BASE_DIM,
    T5_BASE_ENCODER_PARAMS,
    WEIGHT_BYTES,
    MusicGenArch,
    PlanRow,
    StepMemory,
    ZeroLimits,
    accumulation_choices,
    arch_from_checkpoint,
    backward_working_bytes,
    format_plan_table,
    format_recommendations,
    get_arch,
    loss_bytes,
    lowest_fitting,
    max_micro_batch,
    op_workspace_bytes,
    parse_memory,
    plan_memory,
    recommend,
    saved_activation_bytes,
    split_batch,
    step_memory,
    zero_limits,
)
from noencore.planner.shape import StepShape

__all__ = ['StepShape', 'ADAMW_STATE_BYTES', 'ADAMW_TEMP_BYTES', 'ARCHITECTURES', 'CPP_CHUNK_BYTES', 'DEFAULT_GLOBAL_BATCH', 'GIB', 'MAX_LIVE_PARAMETERS', 'MusicGenArch', 'OP_CHUNK_ROWS', 'PlanRow', 'REDUCE_BUCKET_ELEMENTS', 'SUB_GROUP_ELEMENTS', 'StepMemory', 'T5_BASE_DIM', 'T5_BASE_ENCODER_PARAMS', 'WEIGHT_BYTES', 'ZeroLimits', 'accumulation_choices', 'arch_from_checkpoint', 'backward_working_bytes', 'format_plan_table', 'format_recommendations', 'get_arch', 'loss_bytes', 'lowest_fitting', 'max_micro_batch', 'op_workspace_bytes', 'parse_memory', 'plan_memory', 'recommend', 'saved_activation_bytes', 'split_batch', 'step_memory', 'zero_limits']
