"""The chunked op's C++ blocks (impl `cpu`): what tests/test_cope_chunked.py does not cover (it runs its exactness
tests on both kinds of blocks), and when `auto` takes them."""

import functools
import math
import os

import pytest
import torch

from cope_pl.attention import EXPLICIT_ROWS
from cope_pl.ops import cope_attention_chunked, cope_cpu, resolve_cope_impl
from tests.conftest import tiny_model
from tests.cope_dropout import check_dropout_semantics, compare_with_masked_reference, dropout_inputs
from tests.test_cope_chunked import count_chunked_calls, make_inputs

if os.environ.get("CI"):  # CI has a compiler: the blocks must build there, not be skipped
    assert cope_cpu.available(), cope_cpu.build_error()
pytestmark = pytest.mark.skipif(not cope_cpu.available(), reason=f"C++ blocks not built: {cope_cpu.build_error()}")

fused = functools.partial(cope_attention_chunked, fused=True)


def test_the_float32_exp_is_close_to_torchs_over_its_range():
    # Every score and gate goes through the blocks' polynomial exp: one row of scores from 0 down to -87 (where
    # float32's exp reaches its smallest normal numbers), no CoPE term (z and z_step 0).
    logits = torch.linspace(-87, 0, 1000).view(1, -1, 1)  # (G, S, n): keys-major
    probs = torch.ops.cope_pl_cpu.block_probs(logits, torch.empty(0), torch.zeros(1, 1, 4))
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=2e-6, atol=1e-37)


@pytest.mark.parametrize("sep_keys", [False, True])
def test_the_whole_call_runs_under_inference_mode_on_every_thread(sep_keys):
    # Lightning validates under torch.inference_mode(); the C++ call's worker threads must see it too (they write
    # into outputs the calling thread allocated), and give the same output as with autograd on.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        q, k, v, e, gk, _ = make_inputs(4, 2, 40, 40, 16, 8, torch.float32, sep_keys=sep_keys)
        expected = fused(q, k, v, e, gate_k=gk, block_size=8)
        with torch.inference_mode():
            out = fused(q, k, v, e, gate_k=gk, block_size=8)
    finally:
        torch.set_num_threads(threads)
    assert out.is_inference() and torch.equal(out, expected.detach())


@pytest.mark.parametrize("sep_keys", [False, True])
def test_the_whole_call_saves_rows_not_query_by_key_tensors(sep_keys):
    # Backward recomputes the probabilities from each row's softmax max and 1 / sum: what is kept is O(T·D) per
    # head (q, k, v, gate keys, the output) and O(T) (the row statistics), however long the context.
    t, d = 96, 8
    q, k, v, e, gk, _ = make_inputs(1, 2, t, t, d, 8, torch.float32, sep_keys=sep_keys)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        out = fused(q, k, v, e, gate_k=gk, block_size=16)
    out.sum().backward()
    assert saved and max(math.prod(shape) for shape in saved) <= 2 * t * d  # (B·H, T, D)


@pytest.mark.parametrize("sep_keys", [False, True])
def test_cpu_blocks_dropout_is_the_chunked_ops(sep_keys):
    # As the chunked op's dropout tests: the same masks from the same seeds, the masked reference's gradients.
    op = functools.partial(fused, block_size=8)
    inputs = dropout_inputs(t=40, s=48, d=48, sep_keys=sep_keys)
    err, dropped = check_dropout_semantics(op, inputs, p=0.3, seed=5, dtype=torch.float64)
    assert err < 1e-10 and 0.2 < dropped < 0.4
    inputs = dropout_inputs(t=21, s=30, d=32, sep_keys=sep_keys)
    for name, err, scale in compare_with_masked_reference(op, inputs, p=0.25, seed=11, dtype=torch.float64):
        assert err <= 1e-9 * scale + 1e-10, f"{name}: error {err:.2e} for values up to {scale:.2e}"


def test_auto_takes_the_cpu_blocks_only_where_they_apply(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_cope_impl("auto", cpu) == "cpu"
    assert resolve_cope_impl("auto", cpu, relative=True) == "chunked"  # a relative table or bias: torch blocks
    assert resolve_cope_impl("auto", cpu, compiled=True) == "chunked"  # compile asked for: torch blocks
    assert resolve_cope_impl("cpu", torch.device("meta")) == "chunked"
    calls = count_chunked_calls(monkeypatch)
    tiny_model("cope")(torch.randint(0, 23, (1, EXPLICIT_ROWS + 1)))
    tiny_model("relative_cope")(torch.randint(0, 23, (1, EXPLICIT_ROWS + 1)))
    assert [kw["fused"] for kw in calls] == [True] * 2 + [False] * 2  # per layer


def test_without_a_compiler_auto_runs_the_torch_blocks_and_cpu_is_one_clear_error(monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension 'cope_pl_cpu'\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(cope_cpu, "_STATE", {})
    monkeypatch.setattr(cope_cpu, "_build", no_compiler)
    assert not cope_cpu.available()
    assert cope_cpu.build_error() == "RuntimeError: ninja: build stopped: subcommand failed."
    assert resolve_cope_impl("auto", torch.device("cpu")) == "chunked"
    with pytest.raises(ValueError, match=r"impl='cpu' needs the C\+\+ extension, which did not build \(Runtime"):
        tiny_model("cope", position_options={"impl": "cpu"})


def test_cpu_blocks_refuse_what_they_do_not_compute():
    q, k, v, e, _, r = make_inputs(1, 1, 8, 8, 4, 4, torch.float32, rel=3)
    with pytest.raises(ValueError, match="without a relative table, bias or compile"):
        fused(q, k, v, e, rel_emb=r)
