"""The fused Triton CoPE kernel against the reference op, run by Triton's CPU interpreter (no GPU needed).

On a GPU, `COPE_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/test_cope_triton.py` runs the same checks on CUDA
tensors with the kernels compiled for it (`python -m cope_pl.bench.gpu_check` does).

Errors are measured against the reference evaluated in float64 on the same (rounded) inputs.
float32: every output and gradient within 1e-4 of the largest entry of that tensor, plus 1e-5.
float16/bfloat16: within twice the error of the reference op run in the same dtype, plus 1e-3 of the largest entry.
"""

import functools
import importlib.util
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from cope_pl.bench.accuracy import NAMES, outputs_and_grads
from cope_pl.ops import cope_attention, cope_triton
from cope_pl.ops.cope_triton import choose_backward, cope_attention_triton, triton_available
from tests.conftest import TEST_DEVICE
from tests.cope_dropout import check_dropout_semantics, compare_with_masked_reference, dropout_inputs

# tests/conftest.py sets TRITON_INTERPRET=1 before triton is first imported; these tests use CPU tensors.
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not triton_available(),
    reason="triton is not installed, or TRITON_INTERPRET is off and there is no GPU",
)
BACKWARDS = ("two_pass", "atomic")


def make_inputs(b, h, t, s, d, npos, sep_keys, dtype, gate_scale=1.0):
    q = torch.randn(b, t, h, d).transpose(1, 2)  # a strided view, as the model hands it over
    k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    gate_k = torch.randn(b, h, s, d) * gate_scale if sep_keys else None
    inputs = [q, k, v, torch.randn(d, npos), gate_k]
    return [None if x is None else x.to(TEST_DEVICE, dtype) for x in inputs]


def compare(inputs, dtype, backward):
    """(name, fused error, reference error in dtype, scale) for the output and each gradient."""
    weights = torch.randn(inputs[0].shape).to(TEST_DEVICE)
    exact = outputs_and_grads(cope_attention, inputs, torch.float64, weights)
    fused_op = functools.partial(cope_attention_triton, backward=backward)
    fused = outputs_and_grads(fused_op, inputs, dtype, weights)
    same_dtype = outputs_and_grads(cope_attention, inputs, dtype, weights)
    assert fused[0].dtype == dtype
    return [
        (name, (f.double() - e).abs().max().item(), (r.double() - e).abs().max().item(), e.abs().max().item())
        for name, e, f, r in zip(NAMES, exact, fused, same_dtype)
    ]


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(
    "b,h,t,s,d,npos,sep_keys",
    [
        (1, 1, 1, 1, 16, 8, False),  # a single token
        (2, 2, 5, 5, 16, 8, False),
        (1, 2, 17, 17, 32, 16, False),  # T not a multiple of the 16-wide tiles
        (1, 2, 17, 17, 32, 16, True),  # sep-keys
        (2, 1, 5, 37, 16, 12, True),  # key cache: S > T, P not a power of two
        (1, 1, 33, 33, 24, 8, False),  # D not a power of two
        (1, 2, 19, 19, 64, 256, True),  # the intended head dims, npos_max at its limit
        (1, 1, 21, 26, 128, 64, False),
    ],
)
def test_float32_output_and_every_gradient_match_reference(b, h, t, s, d, npos, sep_keys, backward):
    inputs = make_inputs(b, h, t, s, d, npos, sep_keys, torch.float32)
    for name, err, _, scale in compare(inputs, torch.float32, backward):
        assert err <= 1e-4 * scale + 1e-5, f"{name}: error {err:.2e} for values up to {scale:.2e}"


@needs_triton
@pytest.mark.parametrize("sep_keys", [False, True])
def test_tile_shapes_of_each_kernel_may_differ(monkeypatch, sep_keys):
    # The GPU autotuner picks each kernel's tiles on its own: rectangular, and the key pass walking query tiles of
    # another height than the query pass that wrote its carries. Only the key tile width is shared.
    monkeypatch.setattr(cope_triton, "FIXED_TILES", {"forward": (32, 16), "query": (16, 32), "key": (32, 32)})
    inputs = make_inputs(1, 2, 45, 50, 32, 16, sep_keys, torch.float32)
    for name, err, _, scale in compare(inputs, torch.float32, "two_pass"):
        assert err <= 1e-4 * scale + 1e-5, f"{name}: error {err:.2e} for values up to {scale:.2e}"


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("sep_keys", [False, True])
def test_clamped_positions_match_reference(sep_keys, backward):
    # Wide open gates and P = 4 over 40 keys: most positions hit npos_max - 1, where the gradient stops.
    inputs = make_inputs(1, 1, 40, 40, 16, 4, sep_keys, torch.float32, gate_scale=3.0)
    if not sep_keys:
        inputs[1] = inputs[1] * 3.0
    for name, err, _, scale in compare(inputs, torch.float32, backward):
        assert err <= 1e-4 * scale + 1e-5, f"{name}: error {err:.2e} for values up to {scale:.2e}"


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_as_accurate_as_reference_in_that_dtype(dtype, backward):
    inputs = make_inputs(1, 2, 20, 24, 32, 16, True, dtype)
    for name, err, ref_err, scale in compare(inputs, dtype, backward):
        assert err <= 2 * ref_err + 1e-3 * scale, f"{name}: error {err:.2e}, reference in {dtype} {ref_err:.2e}"


@needs_triton
def test_saves_nothing_quadratic_for_backward():
    # Autograd keeps q, k, v, z (T x P), the output and two per-row floats: O(T (D + P)) per head, never (T, S).
    b, h, t, d, npos = 1, 2, 96, 16, 8
    q, k, v, e, _ = (
        x if x is None else x.requires_grad_() for x in make_inputs(b, h, t, t, d, npos, False, torch.float32)
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        cope_attention_triton(q, k, v, e)
    assert saved and max(math.prod(shape) for shape in saved) <= b * h * t * max(d, npos)


def test_auto_backward_keeps_memory_linear():
    # Two carries per row and key tile vs z and dz (P per row each): two passes up to P key tiles, atomics beyond.
    assert choose_backward("auto", n_key_tiles=64, npos=64) == "two_pass"
    assert choose_backward("auto", n_key_tiles=65, npos=64) == "atomic"
    assert choose_backward("two_pass", n_key_tiles=500, npos=64) == "two_pass"
    assert choose_backward("atomic", n_key_tiles=1, npos=64) == "atomic"


def test_rejects_unknown_backward():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="backward must be one of"):
        cope_attention_triton(q, q, q, torch.randn(16, 8), backward="fast")


@needs_triton
def test_bfloat16_gate_sums_are_kept_in_float32():
    # gate_k = 0 makes every gate exactly 1/2, so positions are (i - j + 1) / 2 and reach 150 over 300 keys. A bf16
    # running sum cannot hold 133.5 (spacing 1 above 128) and reads the wrong embeddings for the far keys (about
    # 0.05 off here); torch's own bf16 reference op is 0.14 off. bf16 rounding of the output alone is below 0.008.
    b, h, t, s, d, npos = 1, 1, 4, 300, 16, 256
    q, k, v, e, _ = make_inputs(b, h, t, s, d, npos, False, torch.bfloat16)
    gate_k = torch.zeros(b, h, s, d, dtype=torch.bfloat16, device=TEST_DEVICE)
    fused = cope_attention_triton(q, k, v, e, gate_k=gate_k)
    exact = cope_attention(*(x.double() for x in (q, k, v, e)), gate_k=gate_k.double())
    assert (fused.double() - exact).abs().max().item() < 1.5e-2


@needs_triton
def test_bf16_autocast_leaves_the_fused_op_unchanged():
    # bf16-mixed training runs attention under autocast, which rounded z = q E to bf16 (about 0.01 off at this shape).
    q, k, v, e, _ = make_inputs(1, 2, 20, 20, 32, 16, False, torch.bfloat16)
    plain = cope_attention_triton(q, k, v, e)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        autocast = cope_attention_triton(q, k, v, e)
    assert torch.equal(plain, autocast)


def test_rejects_fewer_keys_than_queries():
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="S=3 < T=4"):
        cope_attention_triton(q, k, k, torch.randn(16, 8))


def test_rejects_npos_max_above_256():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="npos_max <= 256"):
        cope_attention_triton(q, q, q, torch.randn(16, 257))


def test_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cope_attention_triton(q, q, q, torch.randn(16, 8))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("variant", [[], ["--sep-keys", "--dropout"]])
def test_every_kernel_compiles_for_h100_without_a_gpu(tmp_path, variant):
    # The interpreter runs the kernels as Python; this lowers them through ptxas for sm_90, which the interpreter
    # never does (layouts of tl.gather and tl.cumsum, shared memory, the constexpr branches).
    cmd = [sys.executable, "-m", "cope_pl.bench.kernel_stats", "--head-dims", "64", "--npos-max", "256"]
    cmd += ["--max-tiles", "1", "--out", str(tmp_path), *variant]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    stats = pd.read_csv(tmp_path / "triton_kernels.csv")
    assert list(stats.kernel) == ["forward", "backward query pass", "backward key pass", "backward atomic"]
    assert stats.registers.between(1, 255).all()
    assert (stats.shared_kib <= 227).all(), "an H100 program gets at most 227 KiB of shared memory"
    assert (tmp_path / "triton_kernels.md").read_text().count("\n| backward") == 3


@needs_triton
@pytest.mark.parametrize("sep_keys", [False, True])
def test_dropout_keeps_reference_probabilities_scaled_and_drops_about_p(sep_keys):
    inputs = dropout_inputs(t=40, s=48, d=48, sep_keys=sep_keys, device=TEST_DEVICE)
    err, dropped = check_dropout_semantics(cope_attention_triton, inputs, p=0.3, seed=5)
    assert err < 1e-5
    assert 0.2 < dropped < 0.4  # 2 x 2 x 1,140 causal entries; a wrong mask rate shows


@needs_triton
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("sep_keys", [False, True])
def test_dropout_gradients_match_reference_with_the_same_mask(sep_keys, backward):
    op = functools.partial(cope_attention_triton, backward=backward)
    inputs = dropout_inputs(t=21, s=30, d=32, sep_keys=sep_keys, device=TEST_DEVICE)
    for name, err, scale in compare_with_masked_reference(op, inputs, p=0.25, seed=11):
        assert err <= 1e-4 * scale + 1e-5, f"{name}: error {err:.2e} for values up to {scale:.2e}"


@needs_triton
def test_dropout_masks_follow_the_seed():
    q, k, v, e = (x.float() for x in dropout_inputs(t=16, s=16, d=16, sep_keys=False, device=TEST_DEVICE)[:4])
    first, again = (cope_attention_triton(q, k, v, e, dropout_p=0.5, dropout_seed=3) for _ in range(2))
    other = cope_attention_triton(q, k, v, e, dropout_p=0.5, dropout_seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="dropout must be in"):
        cope_attention_triton(q, k, v, e, dropout_p=1.0)
