"""`cope-pl plan`: the fake-tensor trace agrees with real tensors, and the command writes what it promises."""

from __future__ import annotations

import json

import pytest

from cope_pl import plan
from cope_pl.op_costs import GPUS, launches

TINY = ["--config", "configs/trainer/cpu.yaml", "--config", "configs/data/flipflop_cpu.yaml"]
TINY += ["--config", "configs/model/tiny.yaml"]


def traced(position: str, fake: bool, target: str) -> dict:
    cli = plan.build([*TINY, "--config", f"configs/position/{position}.yaml"], fake=fake, target=target)
    return plan.trace(cli, GPUS["h100-80gb"], target)["phases"]


@pytest.mark.parametrize("position", ["rope", "cope"])
def test_fake_trace_matches_real_tensors(position):
    """On the CPU (CoPE: the C++ blocks, through their fake shapes), fake and real tensors dispatch the same
    training step and peak within 10 %; validation differs only in how torchmetrics copies its scalar states."""
    real, fake = traced(position, False, "cpu"), traced(position, True, "cpu")
    for name in ("forward_backward", "optimizer"):
        assert (fake[name].ops, fake[name].kernels, fake[name].flops) == (
            real[name].ops,
            real[name].kernels,
            real[name].flops,
        ), name
    for name in ("forward_backward", "optimizer", "validate"):
        assert abs(fake[name].peak_bytes / real[name].peak_bytes - 1) < 0.1, name
    assert fake["validate"].flops == real["validate"].flops
    # The metrics' scalar states are copied (real) or cloned (fake): only those ops may differ.
    real_ops, fake_ops = real["validate"].by_op, fake["validate"].by_op
    differ = {op for op in set(real_ops) | set(fake_ops) if (op in real_ops) != (op in fake_ops)}
    assert differ <= {"aten::copy_", "aten::clone", "aten::set_.source_Storage_storage_offset"}, differ
    assert abs(fake["validate"].kernels - real["validate"].kernels) <= 0.05 * real["validate"].kernels


def test_cuda_target_runs_the_fused_kernel_not_the_cpu_blocks():
    """The plan takes CoPE's device decision for CUDA: the fused kernel's ops (unchecked: nothing real runs in a
    trace), not the C++ blocks the same model runs on a CPU."""
    cpu, cuda = traced("cope", True, "cpu"), traced("cope", True, "cuda")
    cope_ops = {phase: {op for op in ops["forward_backward"].by_op if "cope" in op} for phase, ops in
                (("cpu", cpu), ("cuda", cuda))}  # fmt: skip
    assert cope_ops["cpu"] == {"cope_pl_cpu::attention_forward", "cope_pl_cpu::attention_backward"}
    assert cope_ops["cuda"] == {"cope_pl::triton_forward", "cope_pl::triton_backward"}


def test_plan_writes_json_with_fallback(tmp_path, capsys):
    plan.main([*TINY, "--config", "configs/position/cope.yaml", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "plan.json").read_text())
    for key in ("peak_memory_gib", "kernels_per_step", "est_step_s", "fits"):
        assert key in result and key in result["fallback"]
    # On CUDA `auto` takes the fused kernel, traced through its fake shapes: one op each way in place of the
    # chunked op's block loop, which the fallback keys plan.
    assert result["fits"] is True and result["attention"] == "triton" and "fused" not in result
    assert result["kernels_per_step"] > 0 and 0 < result["est_step_s"] < 1
    assert 0 < result["kernels_per_step"] < result["fallback"]["kernels_per_step"]
    assert "GPU figures: NVIDIA data sheets" in capsys.readouterr().out


def test_a_config_that_does_not_fit_names_a_batch_that_does(tmp_path):
    """A batch far beyond the GPU: one line with a batch size and accumulation that keep the global batch."""
    big = [*TINY, "--config", "configs/position/rope.yaml", "--data.init_args.batch_size=65536"]
    result = plan.plan(big, "a100-40gb")
    assert not result["fits"]
    fix = result["fix"]
    batch = int(fix.split("batch_size=")[1].split()[0])
    accumulate = int(fix.split("accumulate_grad_batches=")[1].split()[0])
    assert batch * accumulate == 65536 and batch < 65536


def test_foreach_ops_launch_per_chunk():
    import torch

    many = [torch.zeros(1) for _ in range(300)]
    assert launches(torch.ops.aten._foreach_add_.List, (many, many)) == 5  # 64 tensors per launch with 2 lists
    assert launches(torch.ops.aten.view.default, ()) == 0


def test_plan_without_configs_is_one_line_error():
    with pytest.raises(ValueError, match="needs --config"):
        plan.main([])


def test_cuda_policy_fuses_attention_with_dropout_and_runs_norms_in_float32():
    """On fake CPU tensors under the plan's CUDA policy, attention dropout keeps SDPA one fused op (no (T, T)
    products), and bf16 autocast gives layer_norm and softmax float32 results, as on CUDA."""
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cope_pl.cuda_policy import CudaPolicy
    from cope_pl.op_costs import OpCosts

    with FakeTensorMode(), CudaPolicy(), torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.randn(2, 4, 64, 16, requires_grad=True)
        with OpCosts(GPUS["h100-80gb"]) as costs:
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True).sum().backward()
        x = torch.randn(8, 16, dtype=torch.bfloat16)
        assert F.layer_norm(x, (16,)).dtype == torch.float32
        assert torch.softmax(x, -1).dtype == torch.float32
    ops = costs.current.kernels_by_op
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::bmm" not in ops and "aten::matmul" not in ops
