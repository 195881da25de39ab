"""Pure tensor operations, free of modules and configuration."""

from cope_pl.ops.cope import causal_mask, contextual_positions, cope_attention, cope_position_logits
from cope_pl.ops.cope_chunked import cope_attention_chunked
from cope_pl.ops.cope_triton import cope_attention_triton, triton_available
from cope_pl.ops.dispatch import (
    COPE_IMPLS,
    check_cope_impl,
    decision_device,
    resolve_cope_impl,
    run_cope_attention,
    target_device,
)

__all__ = [
    "COPE_IMPLS",
    "causal_mask",
    "contextual_positions",
    "check_cope_impl",
    "cope_attention",
    "cope_attention_chunked",
    "cope_attention_triton",
    "cope_position_logits",
    "decision_device",
    "resolve_cope_impl",
    "run_cope_attention",
    "target_device",
    "triton_available",
]
