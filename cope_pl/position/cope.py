"""Contextual Position Encoding (Golovneva et al. 2024).

Each head gates every earlier key with sigmoid(q_i . k_j / sqrt(D)); a key's position seen from query i
is the sum of the gates between them, and q_i . e[p_ij] (interpolated) is added to the logit. One
position table per layer, shared by its heads (paper, Appendix B). `cope_sepkeys` gates with a separate
key projection instead of the attention keys.

Ablations of the official code (facebookresearch/RAM, projects/cope): `divide_by_sqrt_d` divides the
CoPE term by sqrt(D) together with the content logits (that code's default; the paper's listing adds it
unscaled, this project's default), `shared_table` uses one position table for every layer, and `value_gates`
computes the gates from the values, sigmoid(q_i . v_j / sqrt(D)), instead of the keys. CoPE on every k-th
layer, relative PE on every layer, is `cope_every_k` (compose.py).

`impl` chooses the op (cope_pl/ops/dispatch.py): `reference` adds the term to explicit (B, H, T, S) logits;
`chunked`, `cpu` and `triton` run the memory-efficient exact op, its C++ blocks, or the fused kernel, attention
dropout included; `auto` picks one of them for the device at call time. `cope_pl.attention` makes that choice;
this module only contributes the term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.attention import ContextualLogits, Term
from cope_pl.ops import check_cope_impl
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("cope")
class ContextualPositionEncoding(PositionEncoding):
    name = "cope"

    def __init__(
        self,
        dims: ModelDims,
        *,
        npos_max: int = 64,
        sep_keys: bool = False,
        value_gates: bool = False,
        divide_by_sqrt_d: bool = False,
        shared_table: bool = False,
        impl: str = "auto",
        compile: bool = False,
    ):
        super().__init__(dims)
        if npos_max < 1:
            raise ValueError(f"model.position_options.npos_max must be >= 1, got {npos_max}")
        if sep_keys and value_gates:
            raise ValueError("model.position_options: value_gates and sep-keys are two sources for the gates; pick one")
        self.value_gates = value_gates
        self.npos_max = npos_max
        self.impl = check_cope_impl(impl)
        self.compile_blocks = compile  # torch.compile the chunked op's block functions
        # Dividing q . e by sqrt(D) is the same as a table scaled by 1 / sqrt(D): every op stays as it is.
        self.term_scale = 1 / math.sqrt(dims.d_head) if divide_by_sqrt_d else 1.0
        # (L, D, P), or (1, D, P) when shared by the layers; zero-initialised as in the paper's code.
        self.pos_emb = nn.Parameter(torch.zeros(1 if shared_table else dims.n_layers, dims.d_head, npos_max))
        self.gate_proj = None
        if sep_keys:
            self.gate_proj = nn.ModuleList(
                nn.Linear(dims.d_model, dims.d_model, bias=False) for _ in range(dims.n_layers)
            )

    def table(self, layer: int, dtype: torch.dtype) -> Tensor:
        """(D, P) position embeddings of a layer, as the op multiplies them with q."""
        shared = self.pos_emb.size(0) == 1
        return (self.pos_emb[0 if shared else layer] * self.term_scale).to(dtype)

    def key_features(self, layer: int, x: Tensor) -> dict[str, Tensor]:
        """Sep-keys: (B, H, T, D) keys for the gates from the layer input; none when gates use the attention keys."""
        if self.gate_proj is None:
            return {}
        b, t, _ = x.shape
        return {"cope_gate_k": self.gate_proj[layer](x).view(b, t, self.dims.n_heads, -1).transpose(1, 2)}

    def attention_terms(self, layer: int, q: Tensor, keys: dict[str, Tensor]) -> list[Term]:
        table = self.table(layer, q.dtype)
        gate_keys = keys["v"] if self.value_gates else keys.get("cope_gate_k")
        return [ContextualLogits(table, gate_keys, impl=self.impl, compiled=self.compile_blocks)]


@register("cope_sepkeys")
def cope_sepkeys(
    dims: ModelDims,
    *,
    npos_max: int = 64,
    divide_by_sqrt_d: bool = False,
    shared_table: bool = False,
    impl: str = "auto",
    compile: bool = False,
) -> ContextualPositionEncoding:
    return ContextualPositionEncoding(
        dims,
        npos_max=npos_max,
        sep_keys=True,
        divide_by_sqrt_d=divide_by_sqrt_d,
        shared_table=shared_table,
        impl=impl,
        compile=compile,
    )
