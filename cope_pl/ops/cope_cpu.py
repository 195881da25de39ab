"""The chunked CoPE op's elementwise work fused for CPU: a small C++ extension (cope_cpu.cpp) built once per machine.

Per query block the chunked op forms logits, gates, positions, the interpolated term and the softmax in about a
dozen tensor passes (and as many again backward), each over a few thousand elements: at the task model's size
that, not the matrix products, is its time. The C++ blocks keep the products (torch's BLAS) and do the rest in
one pass per block each way; without attention dropout the block loop runs in C++ too (`CPUCoPEAttention`),
with dropout the chunked op's Python loop calls the block functions below. They take plain and sep-keys CoPE; a
relative table or distance bias stays on the eager block functions.

The extension is compiled with torch's C++ extension builder on first use and cached in torch's extensions
folder (`make install` builds it, so a run pays nothing). Without a compiler `available()` is False and
`auto` uses the chunked op's torch blocks; `make bench` times a fresh compile and a load (its `build` table).
"""

from __future__ import annotations

import hashlib
import math
import platform
import time
from pathlib import Path

import torch

from cope_pl.ops.interpolation import interpolation_table, interpolation_table_grad

SOURCE = Path(__file__).with_name("cope_cpu.cpp")
_STATE: dict[str, object] = {}
_NONE = torch.empty(0)  # "no gate logits" for the C++ functions: gates from the logits
# The whole-call functions' tasks (heads_per_task); docs/benchmarks.md measures the choice.
TASKS_PER_THREAD = 4
TASK_ELEMENTS = 1 << 17


def _cpu_tag() -> str:
    """Short hash of this CPU's instruction-set flags: the build uses -march=native, so a home folder carried to
    a machine with another CPU must not load code compiled for this one."""
    flags = platform.machine()
    try:
        flags += next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _build() -> None:
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    load(
        # The source's hash too: a build of other source (an older checkout sharing torch's extensions folder) is
        # never loaded in its place.
        name=f"cope_pl_cpu_{_cpu_tag()}_{hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:8]}",
        sources=[str(SOURCE)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _STATE["seconds"] = time.perf_counter() - start
    _register_fakes()


def _register_fakes() -> None:
    """Shapes of the C++ functions' results without running them, for fake tensors (`cope-pl plan`) and
    torch.compile."""
    ops = "cope_pl_cpu::"

    @torch.library.register_fake(ops + "block_probs")
    def _(logits, gate_logits, zz):
        return torch.empty_like(logits)  # (G, S, n)

    @torch.library.register_fake(ops + "block_grads")
    def _(logits, gate_logits, zz, dprobs):
        dgate = torch.empty_like(logits) if gate_logits.numel() else logits.new_empty(0)
        return torch.empty_like(logits), torch.empty_like(logits), dgate, torch.empty_like(zz)

    @torch.library.register_fake(ops + "attention_forward")
    def _(q, k, v, gk, table, block, per_task, scale):
        top = q.new_empty(q.shape[:2])  # (BH, T)
        return torch.empty_like(q), top, torch.empty_like(top)

    @torch.library.register_fake(ops + "attention_backward")
    def _(q, k, v, gk, table, out, top, inv, dout, block, per_task, scale):
        dgk = torch.empty_like(gk) if gk.numel() else q.new_empty(0)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgk, torch.empty_like(table)


def available() -> bool:
    """True once the extension is built and loaded (built here on first call, then cached per machine)."""
    if "ok" not in _STATE:
        try:
            _build()
            _STATE["ok"] = True
        except Exception as err:  # no compiler, no headers: the chunked op runs instead
            lines = str(err).strip().splitlines() or [""]
            _STATE["ok"], _STATE["error"] = False, f"{type(err).__name__}: {lines[-1]}"
    return bool(_STATE["ok"])


def build_error() -> str | None:
    available()
    return _STATE.get("error")  # type: ignore[return-value]


def build_seconds() -> float | None:
    """Seconds the first `available()` of this process took (compile, or loading a cached build)."""
    available()
    return _STATE.get("seconds")  # type: ignore[return-value]


def _block_logits(qb, kb, gkb, scale: float):
    """The block's logits and gate logits (_NONE: gates from the logits), keys-major (G, S, n) as the C++ blocks
    take them; masked entries are left as computed, the C++ blocks never read them."""
    qt, zero = qb.transpose(1, 2), qb.new_zeros(())
    logits = torch.baddbmm(zero, kb, qt, beta=0, alpha=scale)
    return logits, _NONE if gkb is None else torch.baddbmm(zero, gkb, qt, beta=0, alpha=scale)


def fused_block_forward(qb, kb, vb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale: float, drop):
    """`cope_chunked.block_forward` with its elementwise passes in one fused call (no relative table or bias)."""
    logits, gate_logits = _block_logits(qb, kb, gkb, scale)
    probs = torch.ops.cope_pl_cpu.block_probs(logits, gate_logits, qb @ table)  # (G, S, n)
    return torch.bmm((probs if drop is None else probs.mul_(drop.transpose(1, 2))).transpose(1, 2), vb)


def fused_block_backward(qb, kb, vb, gkb, table, rel_emb, bias_b, mask, idx_rel, scale: float, drop, dout):
    """`cope_chunked.block_backward`, same returns, with the elementwise gradients in one fused call."""
    logits, gate_logits = _block_logits(qb, kb, gkb, scale)
    drop = None if drop is None else drop.transpose(1, 2)
    dprobs = torch.bmm(vb, dout.transpose(1, 2))  # (G, S, n), as the logits
    if drop is not None:
        dprobs.mul_(drop)
    probs, dscores, dgate_logits, dzz = torch.ops.cope_pl_cpu.block_grads(logits, gate_logits, qb @ table, dprobs)
    dvb = torch.bmm(probs if drop is None else probs.mul_(drop), dout)
    dqb = dzz @ table.transpose(0, 1)
    dtable = qb.reshape(-1, qb.size(-1)).transpose(0, 1) @ dzz.reshape(-1, dzz.size(-1))
    # Without gate keys dscores is the logits' whole gradient: the softmax's and the gates'.
    dqb = torch.baddbmm(dqb, dscores.transpose(1, 2), kb, alpha=scale)
    dkb = torch.bmm(dscores, qb)
    if gkb is None:
        return dqb, dkb, dvb, None, dtable, None, None
    dqb.baddbmm_(dgate_logits.transpose(1, 2), gkb, alpha=scale)
    return dqb, dkb, dvb, torch.bmm(dgate_logits, qb), dtable, None, None


def heads_per_task(bh: int, block: int, s: int) -> int:
    """Heads per task of the whole-call functions: TASKS_PER_THREAD tasks per thread or more, each task's (heads,
    block rows, keys) tensors within TASK_ELEMENTS, so that a task's block stays in its core's cache (2 and 8
    tasks per thread measured within noise of 4)."""
    tasks = max(1, TASKS_PER_THREAD * torch.get_num_threads())
    return max(1, min(math.ceil(bh / tasks), TASK_ELEMENTS // max(block * s, 1)))


class CPUCoPEAttention(torch.autograd.Function):
    """The chunked op without dropout, its block loop in C++ too (`attention_forward` / `attention_backward` of
    cope_cpu.cpp): same blocks, one call per direction instead of a Python loop over blocks and head groups,
    with threads splitting heads rather than each product's rows. Backward gets, besides the inputs, the output
    and each row's softmax max and 1 / sum (O(T·D) and O(T) per head), not the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, pos_emb, gate_k, block):  # noqa: D102
        b, h, t, d = q.shape
        s = k.size(-2)
        q3 = q.reshape(b * h, t, d).contiguous()
        k3, v3 = (x.flip(-2).reshape(b * h, s, d).contiguous() for x in (k, v))  # keys in reverse order
        gk3 = _NONE if gate_k is None else gate_k.flip(-2).reshape(b * h, s, d).contiguous()
        table, per_task, scale = interpolation_table(pos_emb), heads_per_task(b * h, block, s), 1.0 / math.sqrt(d)
        out, top, inv = torch.ops.cope_pl_cpu.attention_forward(q3, k3, v3, gk3, table, block, per_task, scale)
        ctx.save_for_backward(q3, k3, v3, gk3, pos_emb, out, top, inv)
        ctx.block, ctx.per_task, ctx.shape = block, per_task, (b, h, t, s, d)
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        q3, k3, v3, gk3, pos_emb, out, top, inv = ctx.saved_tensors
        b, h, t, s, d = ctx.shape
        scale = 1.0 / math.sqrt(d)
        dout = grad_out.reshape(b * h, t, d).contiguous()
        dq, dk, dv, dgk, dtable = torch.ops.cope_pl_cpu.attention_backward(
            q3, k3, v3, gk3, interpolation_table(pos_emb), out, top, inv, dout, ctx.block, ctx.per_task, scale
        )
        dk = dk.flip(1).mul_(scale).view(b, h, s, d)
        dgk = dgk.flip(1).mul_(scale).view(b, h, s, d) if dgk.numel() else None
        dv = dv.flip(1).view(b, h, s, d)
        return dq.view(b, h, t, d), dk, dv, interpolation_table_grad(dtable), dgk, None


def report_build() -> None:
    """`make install`: build the extension now (not in the first run) and say how it went; never fails."""
    if available():
        print(f"CPU CoPE blocks (cope_pl/ops/cope_cpu.cpp): ready in {build_seconds():.1f} s")
    else:
        print(f"CPU CoPE blocks not built ({build_error()}); CoPE runs the chunked op's torch blocks instead")
