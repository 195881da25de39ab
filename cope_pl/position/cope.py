"""Contextual Position Encoding (Golovneva et al. 2024).

Each head gates every earlier key with sigmoid(q_i . k_j / sqrt(D)); a key's position seen from query i
is the sum of the gates between them, and q_i . e[p_ij] (interpolated) is added to the logit. One
position table per layer, shared by its heads (paper, Appendix B). `cope_sepkeys` gates with a separate
key projection instead of the attention keys.

Two ablations of the official code (facebookresearch/RAM, projects/cope): `divide_by_sqrt_d` divides the
CoPE term by sqrt(D) together with the content logits (that code's default; the paper's listing adds it
unscaled, this project's default), and `shared_table` uses one position table for every layer.

`impl` chooses the op (cope_pl/ops/dispatch.py): `reference` adds `logit_term` to the logits in the
explicit-softmax path of `PositionEncoding.attend`; `chunked` (and `auto`) and `triton` call the memory-efficient
exact op, or the fused kernel, directly, attention dropout included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cope_pl.ops import causal_mask, check_cope_impl, cope_position_logits, resolve_cope_impl, run_cope_attention
from cope_pl.position.base import ModelDims, PositionEncoding
from cope_pl.position.registry import register


@register("cope")
class ContextualPositionEncoding(PositionEncoding):
    name = "cope"
    adds_logit_term = True

    def __init__(
        self,
        dims: ModelDims,
        *,
        npos_max: int = 64,
        sep_keys: bool = False,
        divide_by_sqrt_d: bool = False,
        shared_table: bool = False,
        impl: str = "auto",
        compile: bool = False,
    ):
        super().__init__(dims)
        if npos_max < 1:
            raise ValueError(f"model.position_options.npos_max must be >= 1, got {npos_max}")
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

    def gate_keys(self, layer: int, x: Tensor) -> Tensor | None:
        """Sep-keys: (B, H, S, D) keys for the gates from the layer input; None when gates use the attention keys."""
        if self.gate_proj is None:
            return None
        b, t, _ = x.shape
        return self.gate_proj[layer](x).view(b, t, self.dims.n_heads, -1).transpose(1, 2)

    def gate_logits(self, layer: int, x: Tensor, q: Tensor, logits: Tensor) -> Tensor:
        gate_k = self.gate_keys(layer, x)
        if gate_k is None:
            return logits  # the layer's own scaled, masked attention logits
        gate = q @ gate_k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
        return gate.masked_fill(~causal_mask(q.size(-2), gate_k.size(-2), q.device), float("-inf"))

    def logit_term(self, layer: int, x: Tensor, q: Tensor, k: Tensor, logits: Tensor) -> Tensor:
        gates = self.gate_logits(layer, x, q, logits)
        return cope_position_logits(q, gates, self.table(layer, q.dtype))

    def runs_fused(self, device: torch.device, relative: bool = False) -> bool:
        """True when attention calls the CoPE op directly instead of adding `logit_term` to explicit logits."""
        return resolve_cope_impl(self.impl, device, relative) != "reference"

    def fused_attend(
        self, layer: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor, dropout_p: float, rel_emb: Tensor | None = None
    ) -> Tensor:
        """Causal CoPE attention on already transformed q, k (B, H, T, D); rel_emb (D, R) adds q_i . r[i - j]."""
        impl = resolve_cope_impl(self.impl, q.device, relative=rel_emb is not None)
        gate_k = self.gate_keys(layer, x)
        pos_emb = self.table(layer, q.dtype)
        return run_cope_attention(
            impl, q, k, v, pos_emb, gate_k, rel_emb, compiled=self.compile_blocks, dropout_p=dropout_p
        )

    def attend(self, layer: int, x: Tensor, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        if not self.runs_fused(q.device):
            return super().attend(layer, x, q, k, v, dropout_p)
        return self.fused_attend(layer, x, q, k, v, dropout_p)


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
