"""What is measured: one callable per case, doing a forward and backward (and optimizer step) on made-up data.

A case is a plain dict (so it can be handed to a child process as JSON):
  attention: {"kind": "attention", "impl": one of ATTENTION_IMPLS, "T", "B", "H", "D", "P",
              "dtype" (optional, default float32)}
  train:     {"kind": "train", "position": rope|cope, "impl": ..., "T", "B", "layers", "d_model", "heads",
              "dropout" (optional, default 0), "precision" (optional: "32" (default) or "bf16-mixed", autocast
              as Lightning's bf16-mixed does)}
  decode:    {"kind": "decode", "position": rope|cope, "S", "cache": bool, "B", "layers", "d_model", "heads"}:
             one new token after S tokens, with the KV cache of those S (truncated back after each call) or
             by a full forward of all S + 1 tokens without one
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cope_pl.ops import cope_attention, cope_attention_chunked, cope_attention_triton

# cpu: the chunked op with its C++ blocks. The fused kernel (CUDA only) with its backward forced: triton = two
# passes, triton_atomic = atomic adds.
ATTENTION_IMPLS = ("sdpa", "reference", "chunked", "chunked_compiled", "cpu", "triton", "triton_atomic")
TRAIN_PRECISIONS = ("32", "bf16-mixed")


def attention_case(case: dict[str, Any], device: torch.device) -> Callable[[], None]:
    b, h, t, d, p = case["B"], case["H"], case["T"], case["D"], case["P"]
    dtype = getattr(torch, case.get("dtype", "float32"))
    q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))  # (B,H,T,D)
    pos_emb = (torch.randn(d, p, device=device, dtype=dtype) / d**0.5).requires_grad_()  # (D, P)
    impl = case["impl"]
    if impl == "sdpa":
        op = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    elif impl == "reference":
        op = lambda: cope_attention(q, k, v, pos_emb)  # noqa: E731
    elif impl in ("chunked", "chunked_compiled", "cpu"):
        compiled, fused = impl == "chunked_compiled", impl == "cpu"
        op = lambda: cope_attention_chunked(q, k, v, pos_emb, compiled=compiled, fused=fused)  # noqa: E731
    elif impl in ("triton", "triton_atomic"):
        backward = "atomic" if impl == "triton_atomic" else "two_pass"
        op = lambda: cope_attention_triton(q, k, v, pos_emb, backward=backward)  # noqa: E731
    else:
        raise ValueError(f"bench: unknown attention implementation {impl!r}; choose one of {list(ATTENTION_IMPLS)}")

    def step() -> None:
        for x in (q, k, v, pos_emb):
            x.grad = None
        op().sum().backward()

    return step


def train_case(case: dict[str, Any], device: torch.device) -> Callable[[], None]:
    from cope_pl.model import TransformerLM

    options = {} if case["position"] == "rope" else {"impl": case["impl"], "compile": case.get("compile", False)}
    model = TransformerLM(
        vocab_size=256,
        n_layers=case["layers"],
        d_model=case["d_model"],
        n_heads=case["heads"],
        max_seq_len=case["T"],
        position=case["position"],
        position_options=options,
        dropout=case.get("dropout", 0.0),
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (case["B"], case["T"] + 1), device=device)
    precision = case.get("precision", "32")
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"bench: precision must be one of {list(TRAIN_PRECISIONS)}, got {precision!r}")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(ids[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()

    return step


def decode_case(case: dict[str, Any], device: torch.device) -> Callable[[], None]:
    from cope_pl.model import TransformerLM

    s = case["S"]
    model = (
        TransformerLM(
            vocab_size=256,
            n_layers=case["layers"],
            d_model=case["d_model"],
            n_heads=case["heads"],
            max_seq_len=s + 1,
            position=case["position"],
        )
        .to(device)
        .eval()
    )
    ids = torch.randint(0, 256, (case["B"], s + 1), device=device)
    if not case["cache"]:
        return torch.no_grad()(lambda: model(ids))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :s], cache=cache)  # the prefill is not timed

    @torch.no_grad()
    def step() -> None:  # `tokens` new tokens after the same S, so one timed call is not a few milliseconds
        for _ in range(case.get("tokens", 1)):
            model(ids[:, s:], cache=cache)
            cache.truncate(s)

    return step


CASES = {"attention": attention_case, "train": train_case, "decode": decode_case}


def make_case(case: dict[str, Any], device: torch.device) -> Callable[[], None]:
    return CASES[case["kind"]](case, device)
