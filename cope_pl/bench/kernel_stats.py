"""`python -m cope_pl.bench.kernel_stats`: compile the fused CoPE kernels for a GPU without one, and tabulate what
ptxas says about each tile candidate: registers per thread, bytes spilled to local memory, shared memory.

Spills are the performance signal there is without a GPU: a spilled kernel reads and writes local memory in its
inner loop. Only the GPU autotuner can say which candidate is fastest. Writes reports/bench/triton_kernels.{csv,md}.
Runs anywhere triton is installed (its wheel carries ptxas); TRITON_INTERPRET must be off, as it is by default.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from cope_pl.bench.table_files import write

KEY_GRAD_NAMES = ("DK", "DV", "DGK")
INT_ARGS = ("T", "S", "NPOS", "N_KEY_TILES", "seed")
FLOAT_ARGS = ("scale", "dropout_p")
FP32_POINTERS = ("Z", "LSE", "GSUM", "DELTA", "DQ", "DZ", "GATE_BEFORE", "DPOS_BEFORE")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cope_pl.bench.kernel_stats", description=__doc__)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--npos-max", type=int, nargs="+", default=[64, 256])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--sep-keys", action="store_true", help="compile the sep-keys variants")
    p.add_argument("--dropout", action="store_true", help="compile the attention-dropout variants")
    p.add_argument("--max-tiles", type=int, default=None, help="only the first N tile candidates of each kernel")
    p.add_argument("--out", type=Path, default=Path("reports/bench"))
    return p.parse_args(argv)


def kernel_cases(args: argparse.Namespace) -> Iterator[dict]:
    """Every (kernel, head dim, npos_max, tile candidate) to compile, as the launcher would run it."""
    from cope_pl.ops import cope_triton
    from cope_pl.ops import cope_triton_kernels as kernels

    forward = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in cope_triton.FORWARD_TILES]
    backward = [
        dict(BLOCK_M=m, BLOCK_N=cope_triton.BACKWARD_BLOCK_N, num_warps=w, num_stages=s)
        for m, w, s in cope_triton.BACKWARD_TILES
    ]
    variants = [
        ("forward", kernels.cope_fwd_kernel, {}, forward),
        ("backward query pass", kernels.cope_bwd_query_kernel, dict(ATOMIC_KEY_GRADS=False), backward),
        ("backward key pass", kernels.cope_bwd_key_kernel, {}, backward),
        ("backward atomic", kernels.cope_bwd_query_kernel, dict(ATOMIC_KEY_GRADS=True), backward),
    ]
    for d in args.head_dims:
        for npos in args.npos_max:
            for name, fn, extra, tiles in variants:
                for tile in tiles[: args.max_tiles]:
                    yield dict(kernel=name, fn=fn, D=d, P=npos, extra=extra, **tile)


def compile_case(case: dict, dtype: str, sep_keys: bool, dropout: bool, arch: int):
    """triton.compile for the target, from the kernel's source: no GPU or driver is involved."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    in_dt = {"bfloat16": tl.bfloat16, "float16": tl.float16, "float32": tl.float32}[dtype]
    pointer = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[dtype]
    atomic = case["extra"].get("ATOMIC_KEY_GRADS", False)
    constants = dict(
        D=case["D"],
        BLOCK_M=case["BLOCK_M"],
        BLOCK_N=case["BLOCK_N"],
        BLOCK_D=max(16, triton.next_power_of_2(case["D"])),
        BLOCK_P=max(16, triton.next_power_of_2(case["P"])),
        SEP_KEYS=sep_keys,
        DROPOUT=dropout,
        IN_DT=in_dt,
        DOT_DT=in_dt,
        PREC="ieee" if dtype == "float32" else "tf32",
        **case["extra"],
    )
    signature = {}
    for name in case["fn"].arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in FP32_POINTERS or (atomic and name in KEY_GRAD_NAMES):
            signature[name] = "*fp32"
        elif name in INT_ARGS:
            signature[name] = "i32"
        else:
            signature[name] = pointer
    names = list(signature)
    source = ASTSource(case["fn"], signature, {(names.index(n),): v for n, v in constants.items()})
    options = dict(num_warps=case["num_warps"], num_stages=case["num_stages"])
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from `ptxas -v`, with the ptxas that triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(path), "-o", os.devnull]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output: {report[-300:]}")
    return int(registers.group(1)), int(spills.group(1))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import triton

    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise SystemExit("cope_pl.bench.kernel_stats: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    rows = []
    for case in kernel_cases(args):
        compiled = compile_case(case, args.dtype, args.sep_keys, args.dropout, args.arch)
        registers, spill_bytes = ptxas_usage(compiled.asm["ptx"], args.arch)
        row = {k: case[k] for k in ("kernel", "D", "P", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        row.update(registers=registers, spill_bytes=spill_bytes, shared_kib=round(compiled.metadata.shared / 1024, 1))
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    note = (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; compiled for sm_{args.arch} with triton "
        f"{triton.__version__}, {args.dtype} inputs, sep-keys {args.sep_keys}, dropout {args.dropout}; ptxas "
        "registers per thread, spill store bytes and shared memory per program. Static figures: nothing ran on a GPU."
    )
    write(df, args.out / "triton_kernels.md", "Fused CoPE kernels: compile statistics", note)
    print(f"wrote {args.out / 'triton_kernels.md'}")
    return df


if __name__ == "__main__":
    main()
