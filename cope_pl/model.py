"""Decoder-only Transformer LM; position information enters only through a PositionEncoding."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cope_pl.attention import (
    ContextualLogits,
    KVCache,
    LayerCache,
    Observer,
    Term,
    causal_attention,
    choose_backend,
    observing,
    recording,
)
from cope_pl.position import ModelDims, PositionEncoding, build_position_encoding


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, position: PositionEncoding, layer: int, start: int = 0, cache: LayerCache | None = None
    ) -> Tensor:
        """x (B, T, C) of the tokens at positions start..; with a cache, their keys join the cached ones."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        q, k = position.transform_qk(layer, q, k, start)
        keys = {"k": k, "v": v, **position.key_features(layer, x)}  # (B, H, T, D) each
        if cache is not None:
            keys = cache.extend(keys)  # (B, H, S, D): every token so far
        terms = position.attention_terms(layer, q, keys)
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(q, keys["k"], keys["v"], terms, dropout_p)  # (B, H, T, D)
        return self.resid_dropout(self.out(y.transpose(1, 2).reshape(b, t, c)))


class Block(nn.Module):
    """Attention + MLP with residuals; pre-norm (GPT-2) or post-norm (original Transformer)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, norm: str):
        super().__init__()
        self.pre_norm = norm == "pre"
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, position: PositionEncoding, layer: int, start: int, cache: LayerCache | None
    ) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), position, layer, start, cache)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, position, layer, start, cache))
        return self.norm2(x + self.mlp(x))


class TransformerLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        n_layers: int = 4,
        d_model: int = 256,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 512,
        dropout: float = 0.0,
        norm: str = "pre",
        position: str = "rope",
        position_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.n_heads={n_heads} must divide model.d_model={d_model}")
        if norm not in ("pre", "post"):
            raise ValueError(f"model.norm must be 'pre' or 'post', got {norm!r}")
        if vocab_size < 1:
            raise ValueError(f"model.vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        dims = ModelDims(n_layers=n_layers, n_heads=n_heads, d_model=d_model, max_seq_len=max_seq_len)
        self.position = build_position_encoding(position, dims, position_options)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout, norm) for _ in range(n_layers))
        # Post-norm blocks already end in a LayerNorm.
        self.final_norm = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale residual projections by depth
            for proj in (block.attn.out, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @torch.no_grad()
    def _layer_terms(self, layer: int) -> list[Term]:
        """The attention terms `layer` contributes, for one token: which forms the layer's attention takes."""
        dims, device = self.position.dims, self.lm_head.weight.device
        x = torch.zeros(1, 1, dims.d_model, device=device)
        q = torch.zeros(1, dims.n_heads, 1, dims.d_head, device=device)
        return self.position.attention_terms(layer, q, {"k": q, "v": q, **self.position.key_features(layer, x)})

    def attention_backend(self) -> str:
        """The attention backend this model's encoding takes on its device ("explicit" holds T x T logits)."""
        return choose_backend(self._layer_terms(0), self.lm_head.weight.device).backend

    def has_cope_term(self) -> bool:
        """Whether any layer's attention has a CoPE term."""
        layers = range(self.position.dims.n_layers)
        return any(isinstance(term, ContextualLogits) for layer in layers for term in self._layer_terms(layer))

    @torch.no_grad()
    def observe_attention(self, input_ids: Tensor, observer: Observer) -> None:
        """One eval-mode forward under `cope_pl.attention.observing(observer)`: every layer's attention hands its
        queries, keys and terms to `observer`, in layer order, then runs on its usual backend (CoPE statistics)."""
        was_training = self.training
        try:
            self.eval()
            with observing(observer):
                self(input_ids)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def record_attention(self, input_ids: Tensor) -> list[dict]:
        """One eval-mode forward under `cope_pl.attention.recording()`: per layer, the attention probabilities
        (B, H, T, T) and, with a CoPE term, its gates and positions (position maps, CoPE statistics)."""
        was_training = self.training
        try:
            self.eval()
            with recording() as records:
                self(input_ids)
        finally:
            self.train(was_training)
        return records

    def new_cache(self) -> KVCache:
        """An empty cache for incremental decoding: pass it to every forward call of one sequence batch."""
        return KVCache(len(self.blocks))

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """(B, T) token ids -> (B, T, V) next-token logits.

        With a cache, input_ids continue the tokens it holds: their keys and values are appended to it and they
        attend to everything before them, so a prefill followed by one token at a time equals one full forward.
        """
        start = 0 if cache is None else cache.length
        self.position.check_length(start + input_ids.size(1))
        x = self.drop(self.position.encode_input(self.tok_emb(input_ids), start))  # (B, T, C)
        for layer, block in enumerate(self.blocks):
            x = block(x, self.position, layer, start, None if cache is None else cache.layers[layer])
        return self.lm_head(self.final_norm(x))  # (B, T, V)
