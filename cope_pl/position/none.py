"""NoPE: no position information beyond the causal mask (Kazemnejad et al. 2023)."""

from cope_pl.position.base import PositionEncoding
from cope_pl.position.registry import register


@register("none")
class NoPositionEncoding(PositionEncoding):
    name = "none"
