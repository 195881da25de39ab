"""What a traced step costs on a GPU: live memory, kernels, FLOPs and a roofline time, from the ops it dispatches.

`OpCosts` is a TorchDispatchMode that sits above the tensors' own mode (a FakeTensorMode in `cope-pl plan`, or
none for real tensors) and sees every aten and custom op once autograd and autocast have decided what runs:
  memory   each new storage counts from the op that makes it until Python frees it (a weak reference), on top
           of a baseline of tensors that existed before (weights, optimizer state): live and peak bytes;
  kernels  ops that launch work on a GPU: not views, not bare allocations; a `_foreach_` op launches one kernel
           per chunk of tensors, as torch's multi_tensor_apply does;
  FLOPs    torch.utils.flop_counter's formulas, plus attention ops it lacks and custom ops that register one;
  time     per op max(FLOPs / peak FLOP/s of its dtype, bytes read and written / memory bandwidth), plus
           LAUNCH_S per kernel (docs/training.md says what this cannot know).
Values that the host would read back from a fake tensor (`.item()`, a truth value) are answered as for healthy
data: True for an `all` (all finite), else False for truth values (no NaN found), 0 for integers, 1.0 for floats.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from cope_pl.ops import cope_triton  # noqa: F401  (defines the cope_pl::triton_* ops counted below)

aten = torch.ops.aten


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_flops: float  # dense peak, FLOP/s (also fp16)
    fp32_flops: float  # dense peak without TF32, FLOP/s
    bandwidth: float  # memory bandwidth, bytes/s
    memory_gib: float  # memory the CUDA driver reports


# The one table of GPUs the plan knows; SXM parts, dense (no sparsity) figures.
GPUS = {
    "h100-80gb": Gpu("NVIDIA H100 80GB SXM", 989.4e12, 66.9e12, 3.35e12, 79.6),
    "h200": Gpu("NVIDIA H200 141GB SXM", 989.4e12, 66.9e12, 4.8e12, 140.4),
    "a100-80gb": Gpu("NVIDIA A100 80GB SXM", 312e12, 19.5e12, 2.039e12, 79.2),
    "a100-40gb": Gpu("NVIDIA A100 40GB SXM", 312e12, 19.5e12, 1.555e12, 39.4),
}
GPU_SOURCE = (
    "NVIDIA data sheets: H100 SXM and H200 SXM (BF16 989.4 TFLOP/s dense, FP32 66.9 TFLOP/s; 3.35 and 4.8 TB/s), "
    "A100 SXM 40GB/80GB (BF16 312 TFLOP/s dense, FP32 19.5 TFLOP/s; 1.555 and 2.039 TB/s); memory as nvidia-smi "
    "reports it"
)
# Host-side cost of one kernel launch from eager PyTorch: the lower end of the 5-10 us usually measured.
LAUNCH_S = 5e-6
# torch's multi_tensor_apply: tensors per launch by the number of tensor lists, elements per chunk, chunks per launch.
FOREACH_TENSORS = {1: 110, 2: 64, 3: 48, 4: 36, 5: 30}
FOREACH_CHUNK, FOREACH_BLOCKS = 65536, 320
# Ops that only allocate, or only change metadata: no kernel.
NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.detach.default, aten.lift_fresh.default, aten.set_.source_Storage,
    aten.resize_.default, aten._local_scalar_dense.default,
}  # fmt: skip
HALF = (torch.float16, torch.bfloat16)
ALL_TRUE = "_read_back_true"  # marks the result of an `all` on fake tensors: read back as True


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def launches(func, args) -> int:
    """Kernels one op launches on a GPU: 0 for views and allocations, per chunk for `_foreach_` ops, else 1."""
    if func in NO_KERNEL or func.is_view:
        return 0
    name = func._overloadpacket.__name__
    if not name.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    n, depth = len(lists[0]), min(len(lists) + (0 if name.endswith("_") else 1), 5)
    chunks = sum(math.ceil(t.numel() / FOREACH_CHUNK) for t in lists[0])
    return max(math.ceil(n / FOREACH_TENSORS[depth]), math.ceil(chunks / FOREACH_BLOCKS), 1)


def _attention_flops(func, args, kwargs, out) -> int | None:
    """Attention ops flop_counter does not know (the CPU fused kernel); causal attention counts half the square."""
    name = func._overloadpacket.__name__
    if not name.startswith("_scaled_dot_product_flash_attention_for_cpu"):
        return None
    shape = [tuple(x.shape) for x in args[:4] if isinstance(x, torch.Tensor)]
    if name.endswith("backward"):  # (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, ...)
        flops, causal = sdpa_backward_flop_count(*shape), bool(args[7] if len(args) > 7 else kwargs.get("is_causal"))
    else:  # (q, k, v, dropout_p, is_causal, ...)
        flops, causal = sdpa_flop_count(*shape[:3]), bool(args[4] if len(args) > 4 else kwargs.get("is_causal"))
    return flops // 2 if causal else flops


# The fused CoPE kernel per causal (query, key) pair (docs/cope-ops.md, "What to expect on a GPU"): tensor-core
# products of 2·D FLOP each (forward 2: q.k, p.v; the two backward passes 7), a third with sep-keys gates; and about
# 100 CUDA-core operations (gates, running sums, gathers, interpolation, softmax), taken as 35 forward, 65 backward.
FUSED_PRODUCTS = {"forward": 2, "backward": 7}
FUSED_ELEMENTWISE = {"forward": 35, "backward": 65}


def _fused_cope_pairs(q_shape, k_shape) -> int:
    bh, t, _ = q_shape
    return bh * t * k_shape[1] // 2


def fused_cope_flops(direction: str, q_shape, k_shape, sep_keys: bool) -> int:
    """Tensor-core FLOPs of the fused kernel's matrix products."""
    products = FUSED_PRODUCTS[direction] * (1.5 if sep_keys else 1)
    return int(_fused_cope_pairs(q_shape, k_shape) * products * 2 * q_shape[-1])


def fused_cope_seconds(direction: str, q_shape, k_shape, sep_keys: bool, gpu: Gpu) -> float:
    """The kernel bound by the slower of its products (bf16 tensor cores) and its elementwise work (fp32 cores,
    one operation per FMA's two FLOP)."""
    elementwise = _fused_cope_pairs(q_shape, k_shape) * FUSED_ELEMENTWISE[direction]
    products = fused_cope_flops(direction, q_shape, k_shape, sep_keys)
    return max(products / gpu.bf16_flops, 2 * elementwise / gpu.fp32_flops)


@register_flop_formula(torch.ops.cope_pl.triton_forward)
def _triton_forward_flops(q, k, v, z, gate_k, *args, out_shape=None, **kwargs) -> int:
    return fused_cope_flops("forward", q, k, gate_k is not None)


@register_flop_formula(torch.ops.cope_pl.triton_backward)
def _triton_backward_flops(q, k, v, z, gate_k, *args, out_shape=None, **kwargs) -> int:
    return fused_cope_flops("backward", q, k, gate_k is not None)


FUSED_OPS = {torch.ops.cope_pl.triton_forward.default: "forward", torch.ops.cope_pl.triton_backward.default: "backward"}


def op_flops(func, args, kwargs, out) -> int:
    attention = _attention_flops(func, args, kwargs, out)
    if attention is not None:
        return attention
    formula = flop_registry.get(func._overloadpacket)
    return 0 if formula is None else int(formula(*args, **kwargs, out_val=out))


@dataclass
class Phase:
    """What one traced phase (a training step, a validation step) dispatched."""

    ops: int = 0
    kernels: int = 0
    flops: int = 0
    bytes: int = 0
    seconds: float = 0.0  # roofline time of the ops, launches included
    peak_bytes: int = 0
    by_op: Counter = field(default_factory=Counter)  # op name -> estimated seconds
    kernels_by_op: Counter = field(default_factory=Counter)


class OpCosts(TorchDispatchMode):
    """Live memory, kernels, FLOPs and estimated time of everything dispatched inside it (see the module text).

    baseline: bytes already allocated (weights, optimizer state). `phase(name)` starts a new phase: its peak
    starts from what is live then."""

    def __init__(self, gpu: Gpu, baseline: int = 0):
        super().__init__()
        self.gpu, self.live, self.phases = gpu, baseline, {}
        self.current = self.phase("setup")
        self._storages: dict[int, int] = {}  # id of a live storage -> its bytes

    def phase(self, name: str) -> Phase:
        self.current = self.phases[name] = Phase(peak_bytes=self.live)
        return self.current

    def _free(self, key: int) -> None:
        self.live -= self._storages.pop(key, 0)

    def _track(self, args, kwargs, out) -> None:
        """Count the storages an op made: not those of its inputs (views, in-place results) nor known ones."""
        inputs = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._storages or key in inputs:
                continue
            size = storage.nbytes()
            self._storages[key] = size
            self.live += size
            weakref.finalize(storage, self._free, key)
        self.current.peak_bytes = max(self.current.peak_bytes, self.live)

    def _cost(self, func, args, kwargs, out) -> None:
        phase, kernels = self.current, launches(func, args)
        phase.ops += 1
        if not kernels:
            return
        flops = op_flops(func, args, kwargs, out)
        written = kwargs.get("out")  # an out= tensor is written, not read: counted once, as the result
        moved = sum(_nbytes(t) for t in _tensors((args, {k: v for k, v in kwargs.items() if v is not written}, out)))
        inputs = _tensors((args, kwargs))
        half = any(t.dtype in HALF for t in inputs) and not any(t.dtype == torch.float32 for t in inputs[:2])
        peak = self.gpu.bf16_flops if half else self.gpu.fp32_flops
        compute = flops / peak
        if func in FUSED_OPS:
            q, k, gate_k = args[0], args[1], args[4]
            compute = fused_cope_seconds(FUSED_OPS[func], q.shape, k.shape, gate_k is not None, self.gpu)
        seconds = max(compute, moved / self.gpu.bandwidth) + kernels * LAUNCH_S
        name = str(func.name() if hasattr(func, "name") else func)
        phase.kernels += kernels
        phase.flops += flops
        phase.bytes += moved
        phase.seconds += seconds
        phase.by_op[name] += seconds
        phase.kernels_by_op[name] += kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries (a fake tensor's device): no op at all
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            self.current.ops += 1
            if not _is_fake(args[0]):
                return func(*args, **kwargs)
            return getattr(args[0], ALL_TRUE, False) or _neutral(args[0].dtype)
        if func is aten.index.Tensor and _is_fake(args[0]) and _has_mask(args[1]):
            args = (args[0], _mask_upper_bound(args[1]))
        elif func in (aten.nonzero.default, aten.masked_select.default) and _is_fake(args[0]):
            out = _dense_nonzero(func, args)
            self._cost(func, args, kwargs, out)
            self._track(args, kwargs, out)
            return out
        out = func(*args, **kwargs)
        self._cost(func, args, kwargs, out)
        self._track(args, kwargs, out)
        if func._overloadpacket is aten.all and _is_fake(out):
            setattr(out, ALL_TRUE, True)
        return out


def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def _neutral(dtype: torch.dtype):
    """What a read-back of a fake scalar gives: no data, so a neutral value that keeps every branch finite."""
    if dtype == torch.bool:
        return False
    return 1.0 if dtype.is_floating_point else 0


def _has_mask(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _mask_upper_bound(indices) -> list:
    """Boolean index masks as the integer indices of every element: the largest result the mask can select."""
    out = []
    for i in indices:
        if i is None or i.dtype not in (torch.bool, torch.uint8):
            out.append(i)
            continue
        out.extend(torch.zeros(i.numel(), dtype=torch.long, device=i.device) for _ in range(i.dim()))
    return out


def _dense_nonzero(func, args):
    """nonzero / masked_select of a fake tensor at its largest size (every element selected)."""
    x = args[0]
    if func is aten.nonzero.default:
        return torch.zeros(x.numel(), x.dim(), dtype=torch.long, device=x.device)
    return torch.zeros(torch.broadcast_shapes(x.shape, args[1].shape).numel(), dtype=x.dtype, device=x.device)
