"""Which CoPE implementation runs: the fused kernel's check on CUDA (run here in Triton's interpreter, with the
CUDA policy taken by `target_device`), and a run trained with `impl: triton` evaluated and resumed on CPU."""

import importlib.util
import warnings

import lightning as L
import pytest
import torch

from cope_pl.ops import cope_triton, resolve_cope_impl, target_device
from cope_pl.ops import dispatch as dispatch_module
from cope_pl.ops.cope_triton import triton_available
from cope_pl.resume import load_trained
from tests.conftest import fitted_run, tiny_model
from tests.test_cope_chunked import count_chunked_calls

needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not triton_available() or torch.cuda.is_available(),
    reason="needs triton in its CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py)",
)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    """Each test sees a process in which the fused kernel was never checked and nothing was warned."""
    monkeypatch.setattr(dispatch_module, "_FUSED_CHECKS", {})
    monkeypatch.setattr(dispatch_module, "_WARNED", set())


def resolve_for_cuda(**kw):
    kw = dict(dtype=torch.float32, table=(16, 8), sep_keys=False) | kw
    with target_device("cuda"):
        return resolve_cope_impl("auto", CPU, **kw)


class NoLaunch:
    """A kernel launcher that launches nothing: the key gradients of the two-pass backward are never written."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class FailsToCompile:
    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PTX assembly aborted due to errors\nptxas fatal: unresolved extern function")

        return launch


def broken(monkeypatch, key_pass):
    real = cope_triton._kernels

    def kernels(autotune):
        forward, query_pass, _ = real(autotune)
        return forward, query_pass, key_pass

    monkeypatch.setattr(cope_triton, "_kernels", kernels)


@needs_interpreter
def test_auto_on_cuda_takes_the_fused_kernel_once_it_agrees_with_the_chunked_op():
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")  # a passing check warns nothing, even from validation's inference mode
        assert resolve_for_cuda() == "triton"
        assert resolve_for_cuda(sep_keys=True) == "triton"
    assert dispatch_module._FUSED_CHECKS == {("cpu", torch.float32, 16, 8, False): None, **{
        ("cpu", torch.float32, 16, 8, True): None}}  # fmt: skip
    # What the kernel does not take is not checked: the chunked op.
    assert resolve_for_cuda(table=(16, cope_triton.MAX_NPOS + 1)) == "chunked"
    assert resolve_for_cuda(dtype=torch.float64) == "chunked"
    with target_device("cuda"):
        assert resolve_cope_impl("auto", CPU, relative=True, table=(16, 8)) == "chunked"


@needs_interpreter
@pytest.mark.parametrize(
    "key_pass,why",
    [(NoLaunch(), r"disagrees with the chunked op \(dk: error"), (FailsToCompile(), r"failed to run \(RuntimeError")],
)
def test_a_broken_fused_kernel_falls_back_to_the_chunked_op_with_one_warning(monkeypatch, key_pass, why):
    broken(monkeypatch, key_pass)
    with pytest.warns(RuntimeWarning, match=r"fused Triton kernel \(torch.float32, head size 16, npos_max 8\) " + why):
        assert resolve_for_cuda() == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once per process: no second check, no second warning
        assert resolve_for_cuda() == "chunked"
    # impl: triton forces the kernel whatever the check says.
    with target_device("cuda"):
        assert resolve_cope_impl("triton", CPU, table=(16, 8)) == "triton"


@needs_interpreter
def test_a_model_on_cuda_runs_the_chunked_op_when_the_kernel_is_broken(monkeypatch):
    broken(monkeypatch, NoLaunch())
    model = tiny_model("cope", d_model=32, n_heads=2, position_options={"npos_max": 8})  # head size 16
    tokens = torch.randint(0, 23, (1, 20))
    with target_device("cuda"), pytest.warns(RuntimeWarning, match="running the chunked op instead"):
        model(tokens)  # the first call checks the kernel
    calls = count_chunked_calls(monkeypatch)
    with target_device("cuda"):
        logits = model(tokens)
    assert len(calls) == 2 and not any(kw["fused"] for kw in calls)  # one per layer, torch blocks as on CUDA
    torch.testing.assert_close(logits, model(tokens))  # on CPU: the C++ blocks, the same function


def test_triton_on_a_machine_without_it_runs_what_auto_picks_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch_module, "triton_available", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"impl='triton' needs a CUDA device; on cpu CoPE runs impl='cpu'"):
        assert resolve_cope_impl("triton", CPU) == "cpu"
    with target_device("cuda"), pytest.warns(RuntimeWarning, match="impl='triton' needs the triton package"):
        assert resolve_cope_impl("triton", torch.device("cuda")) == "chunked"
    with target_device("cuda"):  # a plan on CPU tensors: what the GPU would run
        assert resolve_cope_impl("triton", CPU) == "triton"


def test_a_run_trained_with_impl_triton_evaluates_and_resumes_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch_module, "triton_available", lambda: False)  # as on a machine without triton
    data = {"seq_len": 24, "batch_size": 16, "num_symbols": 6, "eval_size": 32}  # > 16 tokens: the op
    data_class = "cope_pl.data.CopyDataModule"
    with pytest.warns(RuntimeWarning, match="impl='triton' needs a CUDA device"):
        run, _, trained, dm = fitted_run(
            tmp_path, "copy-cope", data_class, data, "cope", position_options={"impl": "triton"}
        )
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["position_options"] == {"impl": "triton"}
    model = load_trained(ckpt)  # the implementation is not part of the checkpoint
    tokens = torch.randint(0, 6, (2, 24))
    torch.testing.assert_close(model.model(tokens), trained.model(tokens))
    calls = count_chunked_calls(monkeypatch)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt)
    assert trainer.global_step == 3 and calls and all(kw["fused"] for kw in calls)  # the C++ blocks
