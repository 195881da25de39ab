"""Timing (median over repeats, after warm-up) and peak memory of one case.

Peak memory on CUDA is `max_memory_allocated` above what the case holds before it runs. On CPU it is the peak
resident set of a fresh child process (one per case, so cases cannot inherit each other's heap), measured from
the moment the case's inputs exist: the kernel's high-water mark is reset via /proc/self/clear_refs, read from
/proc/self/status (VmHWM), with ru_maxrss as the fallback. The child uses a fixed malloc mmap threshold so large
tensors are returned to the system when freed, for every case alike.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from cope_pl.bench.cases import make_case

MIB = 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int):
    """Median seconds per call of each step; repeats interleave the steps so machine noise hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_here(case: dict[str, Any], device: torch.device) -> float:
    """MiB above the case's own inputs at the peak of one step, in this process."""
    step = make_case(case, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    base = _current_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        step()
        peak = _vm_hwm_bytes()
    except OSError:
        peak = None
    if peak is None:
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return max(peak - base, 0) / MIB


def peak_memory(case: dict[str, Any], device: torch.device) -> float:
    """Peak MiB of one step of `case`: in process on CUDA, in a fresh child process on CPU."""
    if device.type == "cuda":
        return peak_memory_here(case, device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "cope_pl.bench.measure", json.dumps(case)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return float("nan")  # e.g. killed for memory; the table shows it as missing
    return float(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(peak_memory_here(json.loads(sys.argv[1]), torch.device("cpu")))
