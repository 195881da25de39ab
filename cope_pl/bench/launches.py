"""`python -m cope_pl.bench.launches`: aten ops (on a GPU, about one kernel launch each) that one CoPE layer's
chunked op dispatches, forward and backward, with the block sizes of a target device.

Runs on real tensors of this machine (CPU) with the decisions taken for `--target` (`cope_pl.ops.target_device`),
so the CUDA policy's count needs no GPU. The backward count includes that of `out.sum()`, the loss.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cope_pl.ops import cope_attention_chunked, target_device


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched within it and the bytes of the largest tensor any of them returns."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


def count_layer(inputs: list, target: str) -> tuple[OpCounter, OpCounter]:
    """(forward, backward) counters of the chunked op on inputs (q, k, v, pos_emb[, gate_k, rel_emb]) of this
    machine, block sizes decided for `target`."""
    with target_device(target):
        with OpCounter() as forward:
            out = cope_attention_chunked(*inputs)
        with OpCounter() as backward:
            out.sum().backward()
    return forward, backward


def add_layer_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """One CoPE layer's shape, defaulting to GPT-2 small on WikiText-103 (B=16, H=12, T=1024, D=64)."""
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--npos-max", type=int, default=64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_shape_arguments(parser)
    parser.add_argument("--target", default="cuda", help="the device whose block sizes are used (cuda, cpu)")
    args = parser.parse_args(argv)
    shape = (args.batch, args.heads, args.length, args.head_dim)
    inputs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    inputs.append(torch.randn(args.head_dim, args.npos_max, requires_grad=True))
    forward, backward = count_layer(inputs, args.target)
    print(
        f"B={args.batch} H={args.heads} T={args.length} D={args.head_dim} npos_max={args.npos_max} "
        f"target={args.target}: {forward.ops} aten ops forward, {backward.ops} backward, "
        f"{forward.ops + backward.ops} in all; largest tensor {max(forward.largest, backward.largest) / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
