"""`python -m cope_pl.bench.gpu_check`: every GPU check of the fused CoPE kernel in one call, sized for minutes.

Steps, each timed, each written to --out as soon as it ends (a run cut off by its time limit keeps what it did):
  1. attention op (`python -m cope_pl.bench`): SDPA (flash), chunked and the fused kernel with each backward, bf16,
     B=4, H=16, D=64, npos_max 64, T=1024..8192, forward + backward time and peak memory -> attention.csv.
     Runs first, T=4096 first, so the autotuner picks tiles at the target shape (its key is head dim, npos_max,
     dtype and flags, not T).
  2. accuracy at long contexts against the float64 reference (`cope_pl.bench.accuracy`) -> accuracy.csv.
  3. a training step at T=2048 under bf16 autocast: RoPE, CoPE with the fused kernel, CoPE chunked -> train_step.csv.
  4. a profile of one forward + backward of each fused variant at the largest T -> profile.txt.
  5. the kernel tests (tests/test_cope_triton.py) on CUDA tensors, compiled for the GPU -> kernel_tests.log.
summary.md holds every table, the project's targets against what was measured, and the tiles the autotuner chose.
At most 6 files, so a remote job's output folder brings all of them back. `--smoke` runs the same steps on tiny
shapes (on CPU, in Triton's interpreter, and only one kernel test) so that the script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from cope_pl.bench import __main__ as bench
from cope_pl.bench.accuracy import accuracy_table
from cope_pl.bench.cases import attention_case
from cope_pl.bench.table_files import markdown

# The project's targets for the fused kernel, on the full-size shapes below.
TARGET_OP_THROUGHPUT_VS_SDPA = 0.5  # forward + backward, T = 4096
TARGET_STEP_TOKENS_VS_ROPE = 0.7  # training step, T = 2048

FULL = dict(
    # 4096 first: the autotuner's key has no T, so the tiles are tuned once, on the first call, at the target length.
    lengths=[4096, 1024, 2048, 8192],
    op=dict(batch=4, heads=16, head_dim=64, npos_max=64),
    # (B, H, T, S, D, P, sep_keys), dtype: long rows, a key cache, the largest head dim and table, fp32 and bf16.
    accuracy=[
        ((1, 4, 4096, 4096, 64, 64, False), torch.bfloat16),
        ((1, 4, 2048, 2048, 64, 64, False), torch.float32),
        ((1, 2, 1000, 1500, 128, 256, True), torch.bfloat16),
    ],
    train=dict(lengths=[2048], batch=4, layers=8, d_model=1024),
    warmup=3,
    repeats=10,
    memory=True,
    tests=None,  # every kernel test
)
SMOKE = dict(
    lengths=[16, 32],
    op=dict(batch=1, heads=1, head_dim=16, npos_max=8),
    accuracy=[((1, 1, 20, 24, 16, 8, True), torch.float32)],
    train=dict(lengths=[32], batch=1, layers=1, d_model=32),
    warmup=0,
    repeats=1,
    memory=False,  # on CPU each measurement is a fresh process: seconds each
    tests="rejects_unknown_backward",  # the suite runs all of them in the interpreter anyway
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cope_pl.bench.gpu_check", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("reports/gpu_check"))
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU: Triton's interpreter)")
    p.add_argument("--minutes", type=float, default=8.0, help="skip steps that would start after this many minutes")
    p.add_argument("--skip", nargs="*", default=[], choices=STEP_NAMES, help="steps to leave out")
    return p.parse_args(argv)


def environment(device: torch.device) -> str:
    import importlib.metadata

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "absent"
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; {device.type} ({name}); torch {torch.__version__}; "
        f"triton {triton_version}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    )


def bench_args(sizes: dict, out: Path, train: bool) -> argparse.Namespace:
    op, tr = sizes["op"], sizes["train"]
    argv = ["--impls", "sdpa", "chunked", "triton", "triton_atomic", "--dtype", "bfloat16", "--out", str(out)]
    argv += ["--lengths", *map(str, sizes["lengths"]), "--batch", str(op["batch"]), "--heads", str(op["heads"])]
    argv += ["--head-dim", str(op["head_dim"]), "--npos-max", str(op["npos_max"])]
    argv += ["--warmup", str(sizes["warmup"]), "--repeats", str(sizes["repeats"])]
    argv += [] if sizes["memory"] else ["--no-memory"]
    if train:  # d_model / heads = the op's head dim
        argv += ["--train-lengths", *map(str, tr["lengths"]), "--train-batch", str(tr["batch"])]
        argv += ["--train-layers", str(tr["layers"]), "--train-d-model", str(tr["d_model"])]
        argv += ["--train-impls", "triton", "chunked", "--train-precision", "bf16-mixed"]
    return bench.parse_args(argv)


def attention_step(ctx: dict) -> str:
    df = bench.attention_table(bench_args(ctx["sizes"], ctx["out"], train=False), ctx["device"])
    op = ctx["sizes"]["op"]
    # Standard attention FLOPs (causal half of QK^T and PV, backward 2.5x forward): a rate both ops are judged on.
    df["sdpa_equiv_tflops"] = 3.5 * 2 * op["batch"] * op["heads"] * df["T"] ** 2 * op["head_dim"] / df.fwd_bwd_ms / 1e9
    df.to_csv(ctx["out"] / "attention.csv", index=False)
    ctx["attention"] = df
    return markdown(df)


def accuracy_step(ctx: dict) -> str:
    df = accuracy_table(ctx["sizes"]["accuracy"], ctx["device"])
    df.to_csv(ctx["out"] / "accuracy.csv", index=False)
    ctx["accuracy"] = df
    return f"{int(df.ok.sum())} of {len(df)} within tolerance.\n\n" + markdown(df)


def train_step(ctx: dict) -> str:
    df = bench.train_table(bench_args(ctx["sizes"], ctx["out"], train=True), ctx["device"])
    df.to_csv(ctx["out"] / "train_step.csv", index=False)
    ctx["train"] = df
    return markdown(df)


def profile_step(ctx: dict) -> str:
    """One forward + backward of each fused variant under torch.profiler; the table of kernels by device time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    device, sizes = ctx["device"], ctx["sizes"]
    op = sizes["op"]
    base = dict(kind="attention", T=max(sizes["lengths"]), B=op["batch"], H=op["heads"], D=op["head_dim"])
    steps = {impl: attention_case(dict(base, P=op["npos_max"], impl=impl, dtype="bfloat16"), device) for impl in
             ("triton", "triton_atomic", "sdpa")}  # fmt: skip
    for step in steps.values():
        step()  # compiled and tuned before the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for impl, step in steps.items():
            with record_function(impl):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    (ctx["out"] / "profile.txt").write_text(f"{base}\n\n{table}\n")
    return f"{base}; top rows in profile.txt:\n\n```\n" + "\n".join(table.splitlines()[:12]) + "\n```"


def kernel_tests_step(ctx: dict) -> str:
    cuda = ctx["device"].type == "cuda"
    env = {**os.environ, "COPE_TEST_DEVICE": ctx["device"].type, "TRITON_INTERPRET": "0" if cuda else "1"}
    repo = Path(__file__).resolve().parents[2]
    # No -q here: pyproject's addopts has one, and a second would drop the "N passed" line the summary quotes.
    cmd = [sys.executable, "-m", "pytest", "tests/test_cope_triton.py", "-p", "no:cacheprovider"]
    cmd += ["-k", ctx["sizes"]["tests"]] if ctx["sizes"]["tests"] else []
    left = max(60.0, ctx["deadline"] - time.monotonic())
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=left)
        log, status = (done.stdout + done.stderr).decode(errors="replace"), f"exit {done.returncode}"
    except subprocess.TimeoutExpired as timeout:  # what it printed so far, as bytes
        log = ((timeout.stdout or b"") + (timeout.stderr or b"")).decode(errors="replace")
        status = f"timed out after {left:.0f} s"
    (ctx["out"] / "kernel_tests.log").write_text(log)
    last = [line for line in log.splitlines() if line.strip()][-1:] or ["(no output)"]
    return f"{status}: {last[0]}"


def autotuned_tiles() -> str:
    """The tiles the autotuner chose, per kernel and tuning key."""
    from cope_pl.ops import cope_triton

    if not cope_triton._autotuning():
        return "no autotuning here (interpreter or AUTOTUNE off)"
    lines = []
    for name, kernel in zip(("forward", "backward query pass", "backward key pass"), cope_triton._kernels(True)):
        for key, config in getattr(kernel, "cache", {}).items():
            lines.append(f"- {name}, key {key}: {config}")
        # Triton keeps the timings of the last key it tuned only: how much the tile choice matters there.
        timings = getattr(kernel, "configs_timings", None) or {}
        for config, ms in sorted(timings.items(), key=lambda item: _first(item[1])):
            lines.append(f"  - candidate {config}: {_first(ms):.4g} ms")
    return "\n".join(lines) or "nothing tuned yet"


def _first(ms) -> float:
    """Triton's timing of a config: a float, or (median, 20th, 80th percentile)."""
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def targets(ctx: dict) -> str:
    lines = []
    att = ctx.get("attention")
    if att is not None and len(att):
        t = 4096 if (att["T"] == 4096).any() else att["T"].max()
        for impl in ("triton", "triton_atomic"):
            row = att[(att["T"] == t) & (att.impl == impl)]
            if len(row):
                ratio = 1 / row.time_vs_sdpa.iloc[0]
                verdict = "met" if ratio >= TARGET_OP_THROUGHPUT_VS_SDPA else "NOT met"
                lines.append(f"- {impl} fwd+bwd throughput vs SDPA at T={t}: {ratio:.2f}x "
                             f"(target >= {TARGET_OP_THROUGHPUT_VS_SDPA}x): {verdict}")  # fmt: skip
            mem = att[att.impl == impl].set_index("T").peak_mib.dropna().sort_index()
            if len(mem) >= 2:
                ratios = ", ".join(f"{mem[b] / mem[a]:.2f}" for a, b in zip(mem.index[:-1], mem.index[1:]))
                lines.append(f"- {impl} peak memory ratio per doubling of T: {ratios} (2.0 = linear)")
    train = ctx.get("train")
    if train is not None and len(train):
        for _, row in train[train.position.str.startswith("cope")].iterrows():
            verdict = "met" if row.tokens_per_s_vs_rope >= TARGET_STEP_TOKENS_VS_ROPE else "NOT met"
            ratio = row.tokens_per_s_vs_rope
            lines.append(f"- training step {row.position} tokens/s vs RoPE at T={row['T']}: {ratio:.2f}x "
                         f"(target >= {TARGET_STEP_TOKENS_VS_ROPE}x): {verdict}")  # fmt: skip
    acc = ctx.get("accuracy")
    if acc is not None:
        lines.append(f"- accuracy: {int(acc.ok.sum())} of {len(acc)} outputs and gradients within tolerance")
    return "\n".join(lines) or "nothing measured"


STEPS = {
    "attention": ("Attention op, bf16, forward + backward", attention_step),
    "accuracy": ("Accuracy against the float64 reference", accuracy_step),
    "train": ("Training step, bf16 autocast", train_step),
    "profile": ("Profile of the fused op", profile_step),
    "tests": ("Kernel tests on the GPU", kernel_tests_step),
}
STEP_NAMES = tuple(STEPS)


def write_summary(ctx: dict, sections: list[str]) -> None:
    text = "\n\n".join(
        [f"# Fused CoPE kernel: GPU check\n\n{ctx['environment']}", "## Targets\n\n" + targets(ctx), *sections,
         "## Autotuned tiles\n\n" + autotuned_tiles()]
    )  # fmt: skip
    (ctx["out"] / "summary.md").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    ctx = dict(device=device, out=args.out, sizes=SMOKE if args.smoke else FULL, deadline=start + 60 * args.minutes)
    ctx["environment"] = environment(device)
    print(ctx["environment"], flush=True)
    sections, failed = [], 0
    for name, (title, run) in STEPS.items():
        if name in args.skip:
            continue
        if time.monotonic() > ctx["deadline"]:
            sections.append(f"## {title}\n\nnot run: past --minutes {args.minutes}")
            continue
        began = time.monotonic()
        try:
            body = run(ctx)
        except Exception:  # a failed step is reported and the others still run
            failed += 1
            body = "FAILED:\n\n```\n" + traceback.format_exc(limit=6) + "```"
        sections.append(f"## {title} ({time.monotonic() - began:.0f} s)\n\n{body}")
        print(f"gpu_check: {name} done at {time.monotonic() - start:.0f} s", flush=True)
        write_summary(ctx, sections)
    print((args.out / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
