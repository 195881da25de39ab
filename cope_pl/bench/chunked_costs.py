"""`python -m cope_pl.bench.chunked_costs`: what one CoPE layer's chunked op would cost on a GPU, op by op.

The chunked op with its CUDA block sizes (what `impl: auto` falls back to on CUDA), forward and the backward of
`out.sum()`, traced on fake tensors as `cope-pl plan` traces a whole step: decisions for `--target`, the plan's
CUDA policy, and `cope_pl.op_costs` for kernels, bytes and the roofline time of each op on `--gpu`. Inputs arrive
as bf16-mixed hands them to the op (q, k, v and the table in `--dtype`), with attention dropout `--dropout`. Per
phase it prints the kernels, bytes moved and estimated milliseconds, the bytes per (query, key) value the blocks
form, and the slowest ops.
"""

from __future__ import annotations

import argparse

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cope_pl.bench.launches import add_layer_shape_arguments
from cope_pl.cuda_policy import CudaPolicy
from cope_pl.op_costs import GPUS, OpCosts
from cope_pl.ops import cope_attention_chunked, target_device
from cope_pl.ops.cope_chunked import block_policy, block_rows

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def block_values(b: int, h: int, t: int, target: str) -> int:
    """(query, key) values the blocks form per layer: each block of n rows reads the keys up to its last query."""
    n = block_rows(t, block_policy(torch.device(target)), b * h, t)
    return b * h * sum(min(n, t - i0) * min(i0 + n, t) for i0 in range(0, t, n))


def layer_costs(shape, npos: int, dtype: torch.dtype, dropout: float, gpu: str = "h100-80gb", target: str = "cuda"):
    """{"forward": Phase, "backward": Phase} of one chunked CoPE layer on fake (B, H, T, D) inputs."""
    b, h, t, d = shape
    with FakeTensorMode():
        q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))
        table = torch.randn(d, npos, dtype=dtype, requires_grad=True)
        costs = OpCosts(GPUS[gpu])
        with target_device(target), CudaPolicy(), costs:
            costs.phase("forward")
            out = cope_attention_chunked(q, k, v, table, dropout_p=dropout, dropout_seed=0)
            costs.phase("backward")
            out.sum().backward()
    return {name: costs.phases[name] for name in ("forward", "backward")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_shape_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--dropout", type=float, default=0.1, help="attention dropout (the paper's LM configs: 0.1)")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    parser.add_argument("--target", default="cuda", help="the device whose block sizes are used (cuda, cpu)")
    parser.add_argument("--top", type=int, default=12, help="slowest ops to list per phase")
    args = parser.parse_args(argv)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    phases = layer_costs(shape, args.npos_max, DTYPES[args.dtype], args.dropout, args.gpu, args.target)
    values = block_values(args.batch, args.heads, args.length, args.target)
    print(
        f"B={args.batch} H={args.heads} T={args.length} D={args.head_dim} npos_max={args.npos_max} {args.dtype} "
        f"dropout={args.dropout} on {GPUS[args.gpu].name}, blocks for {args.target}: {values:,} (query, key) values"
    )
    for name, phase in phases.items():
        print(
            f"{name}: {phase.kernels} kernels, {phase.bytes / 1e9:.2f} GB ({phase.bytes / values:.0f} B per value), "
            f"{phase.flops / 1e9:.0f} GFLOP, est. {phase.seconds * 1e3:.2f} ms"
        )
        for op, seconds in phase.by_op.most_common(args.top):
            print(f"  {op:40s} {seconds * 1e3:7.3f} ms  {phase.kernels_by_op[op]:4d} kernels")
    total = sum(p.seconds for p in phases.values())
    print(f"forward + backward: est. {total * 1e3:.2f} ms per layer")


if __name__ == "__main__":
    main()
