"""`python -m cope_pl.bench`: time and memory of CoPE attention implementations, full training steps and decoding.

Writes reports/bench/attention.{csv,md}, reports/bench/train_step.{csv,md}, reports/bench/train_step_task.{csv,md}
(the `make train` model: 2 layers, d_model 64, batch 16) and reports/bench/decode.{csv,md}.
Ratios (to SDPA for the op, to RoPE for the training step and decoding) are computed within this run, from
timings interleaved in one process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from cope_pl.bench.cases import ATTENTION_IMPLS, TRAIN_PRECISIONS
from cope_pl.bench.measure import make_case, peak_memory, time_steps
from cope_pl.bench.table_files import write


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cpu = not torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m cope_pl.bench", description=__doc__)
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096] if cpu else [1024, 2048, 4096, 8192, 16384],
        help="context lengths T for the attention op",
    )
    p.add_argument(
        "--impls",
        nargs="+",
        default=["sdpa", "reference", "chunked"] + (["cpu"] if cpu else []),
        choices=ATTENTION_IMPLS,
    )
    p.add_argument(
        "--reference-max-len",
        type=int,
        default=2048 if cpu else 8192,
        help="skip the reference op above this T (it holds several (B, H, T, T) tensors)",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--npos-max", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="attention op inputs")
    p.add_argument("--train-lengths", type=int, nargs="*", default=[1024], help="T for the training step")
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-d-model", type=int, default=256)
    p.add_argument(
        "--train-impls",
        nargs="+",
        default=["chunked", "cpu", "reference"] if cpu else ["chunked", "reference"],
        help="CoPE impls in the step",
    )
    p.add_argument("--train-dropout", type=float, default=0.0, help="model dropout (the paper-scale configs use 0.1)")
    p.add_argument(
        "--train-precision", choices=TRAIN_PRECISIONS, default="32", help="bf16-mixed: autocast, as gpu_ddp.yaml trains"
    )
    p.add_argument(
        "--task-lengths", type=int, nargs="*", default=[128, 512], help="T for the training step of the task model"
    )
    p.add_argument("--task-batch", type=int, default=16, help="the task model's batch (configs/data/flipflop_cpu.yaml)")
    p.add_argument("--task-layers", type=int, default=2, help="configs/model/task_cpu.yaml")
    p.add_argument("--task-d-model", type=int, default=64)
    p.add_argument("--decode-lengths", type=int, nargs="*", default=[256, 1024, 4096], help="cached tokens S")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--out", type=Path, default=Path("reports/bench"))
    return p.parse_args(argv)


def header(args: argparse.Namespace, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; device {device.type} ({name}); torch "
        f"{torch.__version__}; {torch.get_num_threads()} threads{load}. Times are medians of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up; the machine may be shared, so compare ratios "
        "within this run. Peak memory: "
        + (
            "CUDA max_memory_allocated above the inputs."
            if device.type == "cuda"
            else "peak RSS above the inputs, one fresh process per case."
        )
    )


def attention_table(args: argparse.Namespace, device: torch.device) -> pd.DataFrame:
    rows = []
    for t in args.lengths:
        impls = [i for i in args.impls if i != "reference" or t <= args.reference_max_len]
        cases = {
            i: dict(
                kind="attention",
                impl=i,
                T=t,
                B=args.batch,
                H=args.heads,
                D=args.head_dim,
                P=args.npos_max,
                dtype=args.dtype,
            )
            for i in impls
        }
        times = time_steps({i: make_case(c, device) for i, c in cases.items()}, device, args.warmup, args.repeats)
        for impl, case in cases.items():
            # Compiling again in a child process costs minutes; the compiled op allocates like the eager one.
            skip_memory = args.no_memory or impl == "chunked_compiled"
            memory = float("nan") if skip_memory else peak_memory(case, device)
            rows.append(dict(T=t, impl=impl, dtype=args.dtype, fwd_bwd_ms=1000 * times[impl], peak_mib=memory))
            print(f"attention T={t} {impl}: {1000 * times[impl]:.1f} ms, {memory:.1f} MiB", flush=True)
    df = pd.DataFrame(rows)
    sdpa = df[df.impl == "sdpa"].set_index("T")
    if len(sdpa):
        df["time_vs_sdpa"] = df.fwd_bwd_ms / df["T"].map(sdpa.fwd_bwd_ms)
        df["memory_vs_sdpa"] = df.peak_mib / df["T"].map(sdpa.peak_mib)
    return df


def train_table(args: argparse.Namespace, device: torch.device, model: str = "train") -> pd.DataFrame:
    """Training steps of RoPE and CoPE; model "train" (--train-*: the paper-like model) or "task" (--task-*)."""
    lengths, batch, layers, d_model = (getattr(args, f"{model}_{x}") for x in ("lengths", "batch", "layers", "d_model"))
    rows = []
    for t in lengths:
        base = dict(
            kind="train",
            T=t,
            B=batch,
            layers=layers,
            d_model=d_model,
            heads=args.heads,
            dropout=args.train_dropout,
            precision=args.train_precision,
        )
        cases = {"rope": dict(base, position="rope", impl="")}
        cases.update({f"cope/{i}": dict(base, position="cope", impl=i) for i in args.train_impls})
        times = time_steps({n: make_case(c, device) for n, c in cases.items()}, device, args.warmup, args.repeats)
        for name, case in cases.items():
            memory = float("nan") if args.no_memory else peak_memory(case, device)
            tokens_per_s = batch * t / times[name]
            rows.append(
                dict(
                    T=t,
                    position=name,
                    step_ms=1000 * times[name],
                    tokens_per_s=tokens_per_s,
                    peak_mib=memory,
                    tokens_per_s_vs_rope=times["rope"] / times[name],
                )
            )
            print(f"train T={t} d_model={d_model} {name}: {tokens_per_s:.0f} tokens/s, {memory:.1f} MiB", flush=True)
    return pd.DataFrame(rows)


DECODE_TOKENS = 16  # new tokens per timed call of a cached decoding step


def decode_table(args: argparse.Namespace, device: torch.device) -> pd.DataFrame:
    rows = []
    for s in args.decode_lengths:
        base = dict(
            kind="decode",
            S=s,
            B=args.decode_batch,
            layers=args.train_layers,
            d_model=args.train_d_model,
            heads=args.heads,
        )
        # Cached and full-forward steps are timed apart: a full forward over S tokens between two cached steps
        # (milliseconds each) leaves their caches cold and their medians moved by 2x from run to run.
        times = {}
        for cache in (True, False):
            cases = {(p, cache): dict(base, position=p, cache=cache, tokens=DECODE_TOKENS if cache else 1)
                     for p in ("rope", "cope")}  # fmt: skip
            steps = {n: make_case(c, device) for n, c in cases.items()}
            calls = time_steps(steps, device, args.warmup, args.repeats)
            times.update({n: seconds / cases[n]["tokens"] for n, seconds in calls.items()})
        for (position, cache), seconds in times.items():
            rows.append(
                dict(
                    S=s,
                    position=position,
                    cache="yes" if cache else "no",
                    ms_per_token=1000 * seconds,
                    tokens_per_s=args.decode_batch / seconds,
                    time_vs_rope=seconds / times[("rope", cache)],
                )
            )
            print(f"decode S={s} {position} cache={cache}: {1000 * seconds:.2f} ms/token", flush=True)
    return pd.DataFrame(rows)


def build_table() -> pd.DataFrame:
    """Seconds to make the CPU C++ blocks usable: compiled from scratch (a fresh extensions folder, as on a new
    machine; `make install` pays this once) and loaded when already built (every later process)."""
    code = "from cope_pl.ops import cope_cpu; assert cope_cpu.available(), cope_cpu.build_error()"
    rows = []
    with tempfile.TemporaryDirectory() as fresh:
        for what, folder in (("compile (fresh machine)", fresh), ("load (already built)", fresh)):
            start = time.perf_counter()
            env = {**os.environ, "TORCH_EXTENSIONS_DIR": folder}
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            rows.append(dict(step=what, seconds=seconds if done.returncode == 0 else float("nan")))
            print(f"CPU blocks {what}: {seconds:.1f} s (whole process)", flush=True)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    note = header(args, device)
    op = f"B={args.batch}, H={args.heads}, D={args.head_dim}, npos_max={args.npos_max}; forward + backward"
    write(attention_table(args, device), args.out / "attention", "CoPE attention op", f"{note}\n\n{op}.")
    if device.type == "cpu" and "cpu" in (*args.impls, *args.train_impls):
        process = "Whole process: python start, torch import, then building or loading cope_pl/ops/cope_cpu.cpp"
        write(build_table(), args.out / "build", "CPU C++ blocks: build and load time", f"{note}\n\n{process}.")
    if args.train_lengths:
        model = (
            f"{args.train_layers} layers, d_model {args.train_d_model}, {args.heads} heads, batch "
            f"{args.train_batch}, dropout {args.train_dropout}, precision {args.train_precision}; forward, backward "
            "and AdamW step"
        )
        write(train_table(args, device), args.out / "train_step", "Training step", f"{note}\n\n{model}.")
    if args.task_lengths:
        model = (
            f"The `make train` model: {args.task_layers} layers, d_model {args.task_d_model}, {args.heads} heads, "
            f"batch {args.task_batch}, dropout {args.train_dropout}, precision {args.train_precision}; forward, "
            "backward and AdamW step"
        )
        table = train_table(args, device, "task")
        write(table, args.out / "train_step_task", "Training step, task model", f"{note}\n\n{model}.")
    if args.decode_lengths:
        model = (
            f"{args.train_layers} layers, d_model {args.train_d_model}, {args.heads} heads, batch {args.decode_batch}; "
            f"one new token after S tokens, with the KV cache (timed {DECODE_TOKENS} at a time, apart from the full "
            "forwards) or by a full forward of all S + 1 tokens"
        )
        write(decode_table(args, device), args.out / "decode", "Decoding", f"{note}\n\n{model}.")
    print(f"wrote the tables in {args.out}/")


if __name__ == "__main__":
    main()
