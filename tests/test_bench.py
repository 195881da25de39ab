"""The benchmark CLI runs end to end on tiny sizes and writes its tables (no timing is asserted)."""

import importlib.util

import pandas as pd
import pytest
import torch

from cope_pl.bench import gpu_check
from cope_pl.bench.__main__ import main
from cope_pl.bench.measure import peak_memory_here
from cope_pl.ops import cope_cpu


def test_bench_cli_writes_csv_and_markdown(tmp_path):
    main(
        ["--lengths", "16", "24", "--impls", "sdpa", "reference", "chunked", "--repeats", "1", "--warmup", "0",
         "--train-impls", "chunked", "reference", "--train-lengths", "16", "--train-layers", "1",
         "--train-d-model", "16", "--train-batch", "1",
         "--task-lengths", "8", "12", "--task-batch", "2", "--task-layers", "1", "--task-d-model", "8",
         "--decode-lengths", "8", "16", "--no-memory", "--out", str(tmp_path)]
    )  # fmt: skip
    attention = pd.read_csv(tmp_path / "attention.csv")
    assert set(attention.impl) == {"sdpa", "reference", "chunked"} and set(attention["T"]) == {16, 24}
    assert (attention[attention.impl == "sdpa"].time_vs_sdpa == 1).all()
    train = pd.read_csv(tmp_path / "train_step.csv")
    assert list(train.position) == ["rope", "cope/chunked", "cope/reference"] and (train.tokens_per_s > 0).all()
    task = pd.read_csv(tmp_path / "train_step_task.csv")
    assert list(task.position) == ["rope", "cope/chunked", "cope/reference"] * 2 and set(task["T"]) == {8, 12}
    assert (task[task.position == "rope"].tokens_per_s_vs_rope == 1).all()
    decode = pd.read_csv(tmp_path / "decode.csv")
    assert len(decode) == 8 and set(decode.S) == {8, 16} and set(decode.cache) == {"yes", "no"}
    assert (decode[decode.position == "rope"].time_vs_rope == 1).all() and (decode.tokens_per_s > 0).all()
    for name, column in (("attention.md", "| T |"), ("train_step.md", "| T |"), ("train_step_task.md", "| T |"),
                         ("decode.md", "| S |")):  # fmt: skip
        text = (tmp_path / name).read_text()
        assert f"torch {torch.__version__}" in text and column in text


@pytest.mark.skipif(not cope_cpu.available(), reason="no C++ compiler: the CPU blocks are not built")
def test_bench_reports_the_cpu_blocks_build_time_from_scratch(tmp_path):
    main(
        ["--lengths", "16", "--impls", "sdpa", "cpu", "--repeats", "1", "--warmup", "0", "--train-lengths",
         "--decode-lengths", "--task-lengths", "--no-memory", "--out", str(tmp_path)]
    )  # fmt: skip
    assert set(pd.read_csv(tmp_path / "attention.csv").impl) == {"sdpa", "cpu"}
    build = pd.read_csv(tmp_path / "build.csv")
    assert list(build.step) == ["compile (fresh machine)", "load (already built)"] and (build.seconds > 0).all()


def test_peak_memory_sees_the_reference_ops_quadratic_tensors():
    case = dict(kind="attention", impl="reference", T=512, B=1, H=4, D=16, P=16)
    # Several (1, 4, 512, 512) float tensors (4 MiB each) and int64 indices (8 MiB each) are alive at once.
    assert peak_memory_here(case, torch.device("cpu")) > 16


def test_bench_runs_the_attention_op_in_the_chosen_dtype(tmp_path):
    main(
        ["--lengths", "16", "--impls", "sdpa", "chunked", "--dtype", "bfloat16", "--repeats", "1", "--warmup", "0",
         "--train-lengths", "--task-lengths", "--decode-lengths", "--no-memory", "--out", str(tmp_path)]
    )  # fmt: skip
    attention = pd.read_csv(tmp_path / "attention.csv")
    assert set(attention.dtype) == {"bfloat16"} and attention.fwd_bwd_ms.notna().all()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gpu_check_runs_every_step_and_reports_the_targets(tmp_path):
    # On CPU the fused op runs in Triton's interpreter (tests/conftest.py): the script a GPU machine runs, end to end.
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    for title, _ in gpu_check.STEPS.values():
        assert f"## {title}" in summary
    assert "FAILED" not in summary and "fwd+bwd throughput vs SDPA" in summary and "tokens/s vs RoPE" in summary
    accuracy = pd.read_csv(tmp_path / "accuracy.csv")
    assert accuracy.ok.all() and set(accuracy.backward) == {"two_pass", "atomic"}
    assert set(pd.read_csv(tmp_path / "attention.csv").impl) == {"sdpa", "chunked", "triton", "triton_atomic"}
    assert "## Kernel tests on the GPU" in summary and "exit 0: 1 passed" in summary  # the pytest subprocess ran
    assert len(list(tmp_path.iterdir())) <= 8  # what a remote job's output folder brings back


def test_gpu_check_lists_the_tiles_the_autotuner_chose_and_timed(monkeypatch):
    from types import SimpleNamespace

    from cope_pl.ops import cope_triton

    tuned = SimpleNamespace(
        cache={(64, 64): "BLOCK_M: 16"}, configs_timings={"BLOCK_M: 16": [0.5, 0.4, 0.6], "BLOCK_M: 64": 0.9}
    )
    monkeypatch.setattr(cope_triton, "_autotuning", lambda: True)
    monkeypatch.setattr(cope_triton, "_kernels", lambda autotune: (tuned, SimpleNamespace(), SimpleNamespace()))
    lines = gpu_check.autotuned_tiles().splitlines()
    assert lines == [
        "- forward, key (64, 64): BLOCK_M: 16",
        "  - candidate BLOCK_M: 16: 0.5 ms",
        "  - candidate BLOCK_M: 64: 0.9 ms",
    ]


def test_gpu_check_full_sizes_parse_as_bench_arguments(tmp_path):
    # The full-size run only happens on a GPU machine: its command line must at least parse here.
    args = gpu_check.bench_args(gpu_check.FULL, tmp_path, train=True)
    assert (
        sorted(args.lengths) == [1024, 2048, 4096, 8192]
        and args.lengths[0] == 4096
        and args.dtype == "bfloat16"
        and not args.no_memory
    )
    assert args.train_impls == ["triton", "chunked"] and args.train_precision == "bf16-mixed"
    assert args.train_d_model // args.heads == args.head_dim == 64
