"""Combinations by name: the paper's rope_cope and relative_cope (Table 5), and cope_every_k.

rope_cope and relative_cope are `ComposedPositionEncoding`s (base.py), as any "a+b" name is: transforms of q and
k (RoPE) apply before any term is computed, so CoPE's gates in rope_cope see the rotated queries and keys, as
the layer's attention logits do; relative_cope's table and CoPE's term run as one pass of the chunked op.
cope_every_k is the official code's `--cope-layers k` ablation: relative PE on every layer and CoPE added on the
layers l with (l + 1) % k == 0; cope_every_k_else_relative puts CoPE alone on layers 0, k, 2k, ... and relative PE
alone on the others.
"""

from __future__ import annotations

from torch import Tensor, nn

from cope_pl.attention import Term
from cope_pl.position.base import ComposedPositionEncoding, ModelDims, PositionEncoding
from cope_pl.position.cope import ContextualPositionEncoding
from cope_pl.position.registry import register
from cope_pl.position.relative import RelativePositionEncoding
from cope_pl.position.rope import RotaryPositionEncoding


@register("rope_cope")
def rope_cope(
    dims: ModelDims, *, npos_max: int = 64, base: float = 10000.0, impl: str = "auto", compile: bool = False
) -> PositionEncoding:
    cope = ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile)
    return ComposedPositionEncoding("rope_cope", [RotaryPositionEncoding(dims, base=base), cope])


@register("relative_cope")
def relative_cope(
    dims: ModelDims,
    *,
    npos_max: int = 64,
    max_distance: int | None = None,
    impl: str = "auto",
    compile: bool = False,
) -> PositionEncoding:
    parts = [
        RelativePositionEncoding(dims, max_distance=max_distance),
        ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile),
    ]
    return ComposedPositionEncoding("relative_cope", parts)


class LayerwiseComposition(PositionEncoding):
    """Several encodings, each active on its own set of layers; on a layer its active parts compose as in
    ComposedPositionEncoding (hooks in the parts' order, attention terms added). Each part keeps parameters
    for every layer, so the layer index means the same inside a part as in the model."""

    def __init__(self, name: str, parts: list[PositionEncoding], layers: list[frozenset[int]]):
        super().__init__(parts[0].dims)
        self.name = name
        self.parts = nn.ModuleList(parts)
        self.layers = layers  # layers[i]: the layers on which parts[i] acts

    def active(self, layer: int) -> list[PositionEncoding]:
        return [part for part, on in zip(self.parts, self.layers) if layer in on]

    def check_length(self, seq_len: int) -> None:
        for part, on in zip(self.parts, self.layers):
            if on:
                part.check_length(seq_len)

    def encode_input(self, x: Tensor, start: int = 0) -> Tensor:
        return x  # the parts are per-layer attention encodings; none changes the embeddings

    def transform_qk(self, layer: int, q: Tensor, k: Tensor, start: int = 0) -> tuple[Tensor, Tensor]:
        for part in self.active(layer):
            q, k = part.transform_qk(layer, q, k, start)
        return q, k

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = {}
        for part in self.active(layer):
            features.update(part.key_features(layer, x))
        return features

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        return [term for part in self.active(layer) for term in part.attention_terms(layer, q, keys)]


def check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"model.position_options.k must be >= 1, got {k}")


@register("cope_every_k")
def cope_every_k(
    dims: ModelDims,
    *,
    k: int = 2,
    npos_max: int = 64,
    max_distance: int | None = None,
    impl: str = "auto",
    compile: bool = False,
) -> PositionEncoding:
    """The official code's `--cope-layers k` (with `--pos-emb cope+rel`): relative PE on every layer, CoPE added
    on the layers l with (l + 1) % k == 0 (the last of every k)."""
    check_k(k)
    relative = RelativePositionEncoding(dims, max_distance=max_distance)
    cope = ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile)
    every = frozenset(range(dims.n_layers))
    cope_layers = frozenset(layer for layer in every if (layer + 1) % k == 0)
    return LayerwiseComposition("cope_every_k", [relative, cope], [every, cope_layers])


@register("cope_every_k_else_relative")
def cope_every_k_else_relative(
    dims: ModelDims,
    *,
    k: int = 2,
    npos_max: int = 64,
    max_distance: int | None = None,
    impl: str = "auto",
    compile: bool = False,
) -> PositionEncoding:
    """CoPE alone on layers 0, k, 2k, ... and relative PE alone on the others (not the official ablation)."""
    check_k(k)
    cope = ContextualPositionEncoding(dims, npos_max=npos_max, impl=impl, compile=compile)
    relative = RelativePositionEncoding(dims, max_distance=max_distance)
    cope_layers = frozenset(layer for layer in range(dims.n_layers) if layer % k == 0)
    return LayerwiseComposition(
        "cope_every_k_else_relative", [cope, relative], [cope_layers, frozenset(range(dims.n_layers)) - cope_layers]
    )
