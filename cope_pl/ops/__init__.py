"""Pure tensor operations, free of modules and configuration."""

from cope_pl.ops.cope import causal_mask, cope_attention, cope_position_logits
from cope_pl.ops.cope_triton import cope_attention_triton, triton_available

__all__ = ["causal_mask", "cope_attention", "cope_attention_triton", "cope_position_logits", "triton_available"]
