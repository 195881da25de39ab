"""RoPE scaling at evaluation: rotary frequencies stretched for contexts longer than the training length.

Named as Hugging Face's `rope_type` values, with their `factor` and `original_max_position_embeddings` (the
run's training length L), and computed as Hugging Face computes them (`transformers.modeling_rope_utils`):

  linear   position interpolation (Chen et al. 2023): every frequency divided by the factor;
  dynamic  NTK-aware scaling, dynamic: at sequence length s > L the base becomes
           base * (factor * s / L - (factor - 1)) ** (D / (D - 2)); unchanged up to L. With a KV cache, keys keep
           the rotation of the length at which they were cached (as in Hugging Face);
  yarn     YaRN (Peng et al. 2023): frequency pairs that turn more than beta_fast times over L keep their
           frequency, those turning fewer than beta_slow times are interpolated by the factor, a linear ramp in
           the pair index between; cos and sin are scaled by 0.1 ln(factor) + 1 (the attention temperature), so
           every logit by its square.

Factor 1 leaves linear and yarn unchanged at every length; Hugging Face's dynamic formula still raises the base
past L at factor 1. Scaling applies to the RoPE part of a model (`rope`, `rope_cope`, `rope+...`), not to xPos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cope_pl.position.base import ModelDims

ROPE_TYPES = ("linear", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"--rope-scaling: unknown rope_type {self.rope_type!r}; choose one of {list(ROPE_TYPES)}")
        if not self.factor >= 1:
            raise ValueError(f"--rope-factor must be >= 1 (the context extension), got {self.factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError("RoPE scaling needs the run's training length (data seq_len) in its config")

    @property
    def label(self) -> str:
        """How a report names it after the encoding: `yarn×4` (as in `rope+yarn×4`)."""
        return f"{self.rope_type}×{self.factor:g}"

    def frequencies(self, base: float, dim: int, seq_len: int) -> tuple[Tensor, float]:
        """(dim/2,) float64 inverse frequencies for a sequence of seq_len tokens, and the cos/sin scale."""
        exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # 2c / D
        original = self.original_max_position_embeddings
        if self.rope_type == "linear":
            return base**-exponents / self.factor, 1.0
        if self.rope_type == "dynamic":
            if seq_len > original:
                base = base * (self.factor * seq_len / original - (self.factor - 1)) ** (dim / (dim - 2))
            return base**-exponents, 1.0
        extrapolation = base**-exponents
        interpolation = extrapolation / self.factor

        def pair_turning(times: float) -> float:  # pair index whose wavelength fits `times` times into L
            return dim * math.log(original / (times * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(pair_turning(self.beta_fast)), 0)
        high = min(math.ceil(pair_turning(self.beta_slow)), dim - 1)
        high = high + 0.001 if high == low else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(
            0, 1
        )  # 0: keep, 1: interpolate
        inv_freq = extrapolation * (1 - ramp) + interpolation * ramp
        return inv_freq, (0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0)


def apply_rope_scaling(model: nn.Module, rope_type: str, factor: float, train_len: int) -> RopeScaling:
    """Set the scaling on every RoPE part of a TransformerLM's position encoding; refuse a model without RoPE."""
    from cope_pl.position.rope import RotaryPositionEncoding

    scaling = RopeScaling(rope_type, float(factor), int(train_len or 0))
    ropes = [m for m in model.position.modules() if type(m) is RotaryPositionEncoding]
    if not ropes:
        raise ValueError(
            f"--rope-scaling needs a model with RoPE, but model.position {model.position.name!r} has none; "
            "leave out --rope-scaling"
        )
    for rope in ropes:
        rope.scaling = scaling
    return scaling


def has_rope(position: str, options: dict | None, dims: ModelDims) -> bool:
    """Whether a model with this `model.position` has a RoPE part that RoPE scaling applies to."""
    from cope_pl.position.registry import build_position_encoding
    from cope_pl.position.rope import RotaryPositionEncoding

    encoding = build_position_encoding(position, dims, options)
    return any(type(m) is RotaryPositionEncoding for m in encoding.modules())
