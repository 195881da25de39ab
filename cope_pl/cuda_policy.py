"""What CUDA runs differently from the CPU kernels that a plan traces, for `cope-pl plan`.

The plan traces on (fake) CPU tensors, so two CPU choices would stand in for CUDA's if left alone:
  attention  F.scaled_dot_product_attention takes CUDA's flash kernel (one fused op each way, O(T) memory, dropout
             included); on CPU, attention dropout sends it to the math path, which holds (B, H, T, S) tensors;
  autocast   CUDA's autocast runs layer_norm, softmax, log_softmax and cumsum in float32 (float32 results); CPU's
             autocast leaves them in the input's bf16 or fp16.
`CudaPolicy` (a TorchFunctionMode, above autograd, so backward follows) makes both calls as CUDA would: the fused
CPU flash op in place of the math path, and float32 inputs for those ops while CPU autocast is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

HALF = (torch.float16, torch.bfloat16)
# CUDA autocast's float32 ops among those a model here calls (its "fp32" and "fp32_set_opt_dtype" lists).
FLOAT32_OPS = {
    F.layer_norm, torch.layer_norm, F.softmax, torch.softmax, Tensor.softmax, F.log_softmax, torch.log_softmax,
    Tensor.log_softmax, torch.cumsum, Tensor.cumsum,
}  # fmt: skip


def _autocast_dtype() -> torch.dtype | None:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool, scale) -> Tensor:
    """Causal or full attention through one fused op each way, as CUDA's flash kernel (B, H, T, D)."""
    dtype = _autocast_dtype()
    if dtype is not None:  # autocast casts SDPA's inputs; the fused op is not on its list
        q, k, v = (x.to(dtype) for x in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]


class CudaPolicy(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is None and len(args) <= 3:
            q, k, v = args
            return flash_attention(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), kwargs.get("scale")
            )
        if func in FLOAT32_OPS and _autocast_dtype() is not None:
            args = tuple(a.float() if isinstance(a, Tensor) and a.dtype in HALF else a for a in args)
        return func(*args, **kwargs)
