"""Causal attention: the one place where it is computed, whatever the position encoding contributes.

A position encoding never implements attention. Besides an input embedding and a q/k transform (see
`cope_pl.position.base`), it contributes *terms* to the logits, in one of three mathematical forms:

  RelativeLogits(table)        q_i . r[clamp(i - j, 0, R - 1)]        (relative, relative_capped)
  DistanceBias(values)         b_h[clamp(i - j, 0, R - 1)]             (ALiBi, bucketed biases)
  ContextualLogits(table, ...) q_i . e[p_ij], CoPE's contextual term  (cope, cope_sepkeys)
  PairBias(values)             b[..., i, j] given for every pair        (FIRE, FoX's forget gates)

and one that replaces the softmax instead of adding a term:

  StickBreaking(offset)        A_ij = sigmoid(z_ij) prod_{j<t<i} (1 - sigmoid(z_it)) over the logits z

`choose_backend` picks how to compute softmax(q.k / sqrt(D) + terms) v from the forms present and the device:
  sdpa      no terms: torch's fused scaled_dot_product_attention;
  chunked   one CoPE term, plus at most one relative table and one distance bias: the exact
            memory-efficient op (O(T) memory, never T x T logits); `triton` is the fused GPU kernel
            (CoPE alone);
  explicit  anything else (a pair bias, stick-breaking), and any call of at most EXPLICIT_ROWS queries (a
            decode step): the (B, H, T, S) logits with every term added, then a softmax (or stick-breaking).
A new encoding that contributes these forms, alone or combined with others, gets the same fast paths.

Queries are the last T of S keys (S > T when decoding with a `KVCache`). `recording()` makes every attention
call take the explicit path and keep its probabilities and CoPE positions (the position maps). `observing(fn)`
hands every call's queries, keys and terms to fn and then runs it as usual, keeping nothing (CoPE statistics).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from cope_pl.ops import causal_mask, contextual_positions, cope_position_logits, resolve_cope_impl, run_cope_attention


def distance_index(t: int, s: int, size: int, device: torch.device) -> Tensor:
    """(T, S) long: clamp(i - j, 0, size - 1) for query i (the last T of S positions) and key j."""
    rows = torch.arange(t, device=device).unsqueeze(1) + (s - t)
    return (rows - torch.arange(s, device=device).unsqueeze(0)).clamp(0, size - 1)


@dataclass
class RelativeLogits:
    """q_i . r[clamp(i - j, 0, R - 1)] from a (D, R) table of relative position embeddings."""

    table: Tensor

    def logits(self, q: Tensor, s: int, content: Tensor) -> Tensor:
        # Distances are below S, so a longer table's later columns are never read: leave them out of the product.
        table = self.table[:, :s].to(q.dtype)
        z = q @ table  # (B, H, T, min(R, S)): q_i . r[d] for every distance d
        index = distance_index(q.size(-2), s, table.size(-1), q.device)
        return z.gather(-1, index.expand(*z.shape[:-2], *index.shape))  # (B, H, T, S)


@dataclass
class DistanceBias:
    """b_h[clamp(i - j, 0, R - 1)] from (H, R) per-head values by distance; independent of the query."""

    values: Tensor

    def logits(self, q: Tensor, s: int, content: Tensor) -> Tensor:
        index = distance_index(q.size(-2), s, self.values.size(-1), q.device)
        return self.values.to(q.dtype)[:, index]  # (H, T, S), broadcast over the batch


@dataclass
class ContextualLogits:
    """CoPE: q_i . e[p_ij] with p_ij = sum_{t=j..i} sigmoid(gate_it), interpolated in a (D, P) table.

    The gates are the content logits q.k / sqrt(D), or q.gate_k / sqrt(D) with separate gate keys (B, H, S, D).
    impl names the op (`cope_pl.ops.dispatch`); compiled torch.compiles the chunked op's blocks.
    """

    table: Tensor
    gate_keys: Tensor | None = None
    impl: str = "auto"
    compiled: bool = False

    def gate_logits(self, q: Tensor, content: Tensor) -> Tensor:
        if self.gate_keys is None:
            return content  # the layer's own scaled, masked logits
        gates = q @ self.gate_keys.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
        return gates.masked_fill(~causal_mask(q.size(-2), gates.size(-1), q.device), float("-inf"))

    def logits(self, q: Tensor, s: int, content: Tensor) -> Tensor:
        return cope_position_logits(q, self.gate_logits(q, content), self.table.to(q.dtype))


@dataclass
class PairBias:
    """b[i, j] given for every (query, key) pair: (H, T, S) or (B, H, T, S); for biases that are not a function
    of i - j alone (FIRE's normalised distances, FoX's data-dependent forget gates)."""

    values: Tensor

    def logits(self, q: Tensor, s: int, content: Tensor) -> Tensor:
        return self.values.to(q.dtype)  # (H, T, S) or (B, H, T, S)


@dataclass
class StickBreaking:
    """Not a logit term: attention weights by stick-breaking over the keys, nearest first, instead of a softmax.

    With z the logits (q.k / sqrt(D) plus any other terms, plus `offset`), key j gets A_ij = sigmoid(z_ij)
    prod_{j<t<i} (1 - sigmoid(z_it)) of query i; with attend_current the query's own key breaks the stick first
    (t <= i, and j = i allowed). The weights need not sum to 1; what is left is not attended (Tan et al. 2025).
    offset (H,), if given, is added to every logit of its head before the stick is broken.
    """

    attend_current: bool = False
    offset: Tensor | None = None

    def weights(self, scores: Tensor) -> Tensor:
        """(B, H, T, S) logits of the last T of S positions -> (B, H, T, S) weights, in log space (float32 at least)."""
        t, s = scores.shape[-2:]
        rows = torch.arange(t, device=scores.device).unsqueeze(1) + (s - t)  # absolute position of each query
        cols = torch.arange(s, device=scores.device).unsqueeze(0)
        breaks = cols <= rows if self.attend_current else cols < rows  # (T, S): keys that take a share
        z = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if self.offset is not None:
            z = z + self.offset.to(z.dtype)[:, None, None]  # (B, H, T, S) + (H, 1, 1)
        log_take = F.logsigmoid(z).masked_fill(~breaks, float("-inf"))  # log sigmoid(z_ij)
        log_leave = F.logsigmoid(-z).masked_fill(~breaks, 0.0)  # log(1 - sigmoid(z_it))
        # Sum over the keys t > j that break the stick before j does: a reverse cumulative sum, shifted by one.
        after = F.pad(log_leave.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))  # (B, H, T, S)
        return torch.exp(log_take + after).to(scores.dtype)


Term = RelativeLogits | DistanceBias | ContextualLogits | PairBias | StickBreaking


@dataclass
class Plan:
    """How one attention call runs: the backend, and for the CoPE op the terms it absorbs."""

    backend: str  # "sdpa", "chunked", "triton" or "explicit"
    cope: ContextualLogits | None = None
    relative: RelativeLogits | None = None
    bias: DistanceBias | None = None


# Up to this many query rows (decode steps, short prefill chunks) the explicit logits hold no more than one
# block of the chunked op (at least 16 rows) and skip its per-call setup.
EXPLICIT_ROWS = 16


def choose_backend(
    terms: list[Term], device: torch.device, rows: int | None = None, dtype: torch.dtype = torch.float32
) -> Plan:
    """The fastest exact way to compute attention with these terms on this device, for `rows` queries (None: a
    long sequence) of `dtype`."""
    if not terms:
        return Plan("sdpa")
    if rows is not None and rows <= EXPLICIT_ROWS:
        return Plan("explicit")
    by_form: dict[type, list[Term]] = {}
    for term in terms:
        by_form.setdefault(type(term), []).append(term)
    cope = by_form.get(ContextualLogits, [])
    relative, bias = by_form.get(RelativeLogits, []), by_form.get(DistanceBias, [])
    only_op_forms = set(by_form) <= {ContextualLogits, RelativeLogits, DistanceBias}  # the CoPE op adds no others
    if only_op_forms and len(cope) == 1 and len(relative) <= 1 and len(bias) <= 1:
        term = cope[0]
        impl = resolve_cope_impl(
            term.impl, device, relative=bool(relative or bias), compiled=term.compiled, dtype=dtype,
            table=tuple(term.table.shape), sep_keys=term.gate_keys is not None,
        )  # fmt: skip
        if impl != "reference":
            return Plan(impl, cope[0], relative[0] if relative else None, bias[0] if bias else None)
    return Plan("explicit")


def _content_logits(q: Tensor, k: Tensor) -> Tensor:
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))  # (B, H, T, S)
    return logits.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))


def explicit_scores(q: Tensor, k: Tensor, terms: list[Term]) -> tuple[Tensor, Tensor]:
    """(scores, content): the full (B, H, T, S) pre-softmax logits with every term added, and q.k / sqrt(D)."""
    content = _content_logits(q, k)
    scores = content
    for term in terms:
        if not isinstance(term, StickBreaking):
            scores = scores + term.logits(q, k.size(-2), content)
    return scores, content


_RECORDS: list[list[dict[str, Tensor | None]]] = []


def record(q: Tensor, content: Tensor, probs: Tensor, terms: list[Term]) -> dict[str, Tensor | int | None]:
    """What one attention call shows: its probabilities and, with a CoPE term, the gates and positions."""
    cope = next((term for term in terms if isinstance(term, ContextualLogits)), None)
    entry = {"attention": probs.detach(), "positions": None, "gates": None, "npos_max": None}
    if cope is not None:
        gate_logits = cope.gate_logits(q, content).detach()
        entry.update(
            gates=torch.sigmoid(gate_logits),  # (B, H, T, S), 0 on masked keys
            positions=contextual_positions(gate_logits, cope.table.size(-1)),
            npos_max=cope.table.size(-1),
        )
    return entry


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, Tensor | None]]]:
    """Within the block, attention runs explicitly and appends a `record` per call: one per layer and forward."""
    records: list[dict[str, Tensor | None]] = []
    _RECORDS.append(records)
    try:
        yield records
    finally:
        _RECORDS.remove(records)


Observer = Callable[[Tensor, Tensor, list[Term]], None]
_OBSERVERS: list[Observer] = []


@contextlib.contextmanager
def observing(observer: Observer) -> Iterator[None]:
    """Within the block, every attention call first hands its q (B, H, T, D), k (B, H, S, D) and terms to
    `observer` (one call per layer and forward), then runs on its usual backend: whatever the observer computes
    from them, the call itself keeps no (T, S) tensor."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, terms: list[Term], dropout_p: float = 0.0) -> Tensor:
    """softmax(q.k / sqrt(D) + terms, causal) v: q (B, H, T, D), k and v (B, H, S, D) with S >= T -> (B, H, T, D)."""
    t, s = q.size(-2), k.size(-2)
    if _OBSERVERS:
        _OBSERVERS[-1](q, k, terms)
    plan = Plan("explicit") if _RECORDS else choose_backend(terms, q.device, rows=t, dtype=q.dtype)
    if plan.backend == "sdpa":
        mask = None if t in (1, s) else causal_mask(t, s, q.device)  # is_causal aligns to the top left when T < S
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=t == s > 1)
    if plan.backend != "explicit":
        cope = plan.cope
        return run_cope_attention(
            plan.backend,
            q,
            k,
            v,
            cope.table.to(q.dtype),
            gate_k=cope.gate_keys,
            rel_emb=None if plan.relative is None else plan.relative.table.to(q.dtype),
            bias=None if plan.bias is None else plan.bias.values.to(q.dtype),
            compiled=cope.compiled,
            dropout_p=dropout_p,
        )
    scores, content = explicit_scores(q, k, terms)
    stick = next((term for term in terms if isinstance(term, StickBreaking)), None)
    probs = torch.softmax(scores, dim=-1) if stick is None else stick.weights(scores)
    if _RECORDS:
        _RECORDS[-1].append(record(q, content, probs, terms))
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v  # (B, H, T, D)


@dataclass
class LayerCache:
    """Keys, values and per-key features (e.g. sep-keys gate keys) of one layer, in buffers that grow by doubling."""

    buffers: dict[str, Tensor] = field(default_factory=dict)
    length: int = 0

    def extend(self, new: dict[str, Tensor]) -> dict[str, Tensor]:
        """Append (B, H, T, D) tensors along T; return views of everything cached so far."""
        t = next(iter(new.values())).size(-2)
        needed = self.length + t
        for name, x in new.items():
            buf = self.buffers.get(name)
            if buf is None or buf.size(-2) < needed:
                grown = x.new_empty(*x.shape[:-2], max(needed, 2 * (0 if buf is None else buf.size(-2))), x.size(-1))
                if buf is not None:
                    grown[..., : self.length, :] = buf[..., : self.length, :]
                self.buffers[name] = buf = grown
            buf[..., self.length : needed, :] = x
        self.length = needed
        return {name: buf[..., :needed, :] for name, buf in self.buffers.items()}


class KVCache:
    """What incremental decoding keeps per layer; `length` tokens have been processed so far."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def truncate(self, length: int) -> None:
        """Forget every token after the first `length` (the buffers stay allocated)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        for layer in self.layers:
            layer.length = length
