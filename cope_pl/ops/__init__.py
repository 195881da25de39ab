"""Pure tensor operations, free of modules and configuration."""

from cope_pl.ops.cope import causal_mask, cope_attention, cope_position_logits

__all__ = ["causal_mask", "cope_attention", "cope_position_logits"]
