"""The chunked CoPE op and the model's `impl` option against the reference op (the specification)."""

import functools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cope_pl.attention import EXPLICIT_ROWS
from cope_pl.bench.launches import OpCounter, count_layer
from cope_pl.ops import causal_mask, cope_attention, cope_attention_chunked, cope_cpu, resolve_cope_impl, target_device
from cope_pl.ops import cope_chunked as chunked_module
from cope_pl.ops import dispatch as dispatch_module
from cope_pl.ops.cope_chunked import MAX_BLOCK_ROWS, block_rows
from tests.conftest import tiny_model
from tests.cope_dropout import check_dropout_semantics, compare_with_masked_reference, dropout_inputs


def make_inputs(b, h, t, s, d, npos, dtype, sep_keys=False, rel=0):
    q = torch.randn(b, h, t, d, dtype=dtype)
    k, v = torch.randn(b, h, s, d, dtype=dtype), torch.randn(b, h, s, d, dtype=dtype)
    e = torch.randn(d, npos, dtype=dtype)
    gk = torch.randn(b, h, s, d, dtype=dtype) if sep_keys else None
    r = torch.randn(d, rel, dtype=dtype) if rel else None
    return [x.requires_grad_() if x is not None else None for x in (q, k, v, e, gk, r)]


def output_and_grads(fn, inputs, weights):
    out = fn(*inputs)
    leaves = [x for x in inputs if x is not None]
    return [out, *torch.autograd.grad((out * weights).sum(), leaves)]


def reference_with_relative(q, k, v, e, gk, r, extra=None):
    """cope_attention with q_i . r[clamp(i - j, 0, R - 1)] (and an optional (H, T, S) term) added to the logits,
    written out in full."""
    from cope_pl.ops import cope_position_logits

    t, s = q.size(-2), k.size(-2)
    mask = causal_mask(t, s)
    logits = (q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~mask, float("-inf"))
    gates = logits if gk is None else (q @ gk.transpose(-1, -2) / math.sqrt(q.size(-1))).masked_fill(~mask, -math.inf)
    logits = logits + cope_position_logits(q, gates, e)
    if r is not None:
        dist = (torch.arange(t).unsqueeze(1) + s - t - torch.arange(s)).clamp(0, r.size(-1) - 1)  # (T, S)
        logits = logits + (q @ r).gather(-1, dist.expand(*q.shape[:-1], s))
    if extra is not None:
        logits = logits + extra
    return torch.softmax(logits, -1) @ v


# The torch blocks, and the same op with its C++ blocks (impl `cpu`; tests/test_cope_cpu.py has the rest).
cpu_blocks = pytest.mark.skipif(not cope_cpu.available(), reason=f"C++ blocks not built: {cope_cpu.build_error()}")
FUSED = [False, pytest.param(True, marks=cpu_blocks, id="cpu_blocks")]

# (T, S, block, npos_max): blocks that do not divide T, S > T (a query block over a longer key cache), and a
# small npos_max so that positions hit the clamp.
SHAPES = [(37, 37, 8, 5), (20, 45, 7, 4), (16, 16, 16, 32), (33, 50, 64, 3)]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("sep_keys", [False, True])
@pytest.mark.parametrize("t,s,block,npos", SHAPES)
def test_chunked_equals_reference_in_float64(sep_keys, t, s, block, npos, fused):
    inputs = make_inputs(2, 3, t, s, 8, npos, torch.float64, sep_keys)[:5]
    weights = torch.randn(2, 3, t, 8, dtype=torch.float64)
    ref = output_and_grads(cope_attention, inputs, weights)
    fast = output_and_grads(lambda *a: cope_attention_chunked(*a, block_size=block, fused=fused), inputs, weights)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("sep_keys", [False, True])
def test_chunked_equals_reference_in_float32(sep_keys, fused):
    # Outputs within 1e-5; gradients within 1e-5 of their largest element (the reference's own float32
    # gradients differ from float64 by more than that in absolute terms; see docs/cope-ops.md).
    inputs = make_inputs(2, 2, 150, 200, 16, 16, torch.float32, sep_keys)[:5]
    weights = torch.randn(2, 2, 150, 16)
    ref = output_and_grads(cope_attention, inputs, weights)
    fast = output_and_grads(lambda *a: cope_attention_chunked(*a, block_size=48, fused=fused), inputs, weights)
    torch.testing.assert_close(fast[0], ref[0], rtol=0, atol=1e-5)
    for a, b in zip(fast[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_clamp_is_hit_in_the_exactness_cases():
    q, k = make_inputs(1, 1, 37, 37, 8, 5, torch.float64)[:2]
    logits = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~causal_mask(37, 37), float("-inf"))
    positions = torch.sigmoid(logits).flip(-1).cumsum(-1).flip(-1)
    assert (positions > 4).any() and (positions[causal_mask(37, 37).expand_as(positions)] < 4).any()


@pytest.mark.parametrize("sep_keys", [False, True])
@pytest.mark.parametrize("rel", [6, 60])  # capped (distances beyond the table share the last entry) and full
def test_chunked_relative_table_equals_explicit_sum(sep_keys, rel):
    inputs = make_inputs(2, 2, 30, 41, 8, 6, torch.float64, sep_keys, rel=rel)
    weights = torch.randn(2, 2, 30, 8, dtype=torch.float64)
    ref = output_and_grads(reference_with_relative, inputs, weights)
    fast = output_and_grads(lambda *a: cope_attention_chunked(*a, block_size=9), inputs, weights)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("width", [5, 41])  # distances past a short bias read its last entry
def test_chunked_distance_bias_equals_explicit_sum(width):
    q, k, v, e, gk, r = make_inputs(2, 3, 30, 41, 8, 6, torch.float64, sep_keys=True, rel=7)
    bias = torch.randn(3, width, dtype=torch.float64, requires_grad=True)  # (H, R)
    distance = (torch.arange(30).unsqueeze(1) + 11 - torch.arange(41)).clamp(0, width - 1)

    def explicit(q, k, v, e, gk, r, bias):
        return reference_with_relative(q, k, v, e, gk, r, extra=bias[:, distance])

    inputs, weights = [q, k, v, e, gk, r, bias], torch.randn(2, 3, 30, 8, dtype=torch.float64)
    ref = output_and_grads(explicit, inputs, weights)
    fast = output_and_grads(lambda *a: cope_attention_chunked(*a[:6], bias=a[6], block_size=7), inputs, weights)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_chunked_saves_no_query_by_key_tensor_for_backward():
    t, block = 64, 16
    saved = []
    inputs = make_inputs(1, 2, t, t, 8, 8, torch.float32, sep_keys=True, rel=8)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        cope_attention_chunked(*inputs, block_size=block)
    assert saved and max(math.prod(shape) for shape in saved) <= 2 * t * 8  # O(T·D) per head: q, k, v, out
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        cope_attention(*inputs[:5])
    assert max(math.prod(shape) for shape in saved) >= 2 * t * t  # the reference keeps (B, H, T, S) tensors


def test_chunked_rejects_fewer_keys_than_queries():
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(ValueError, match="S=3 < T=4"):
        cope_attention_chunked(q, q[..., :3, :], q[..., :3, :], torch.randn(2, 3))


@pytest.mark.parametrize(
    "position,impl",
    [(p, "chunked") for p in ("cope", "cope_sepkeys", "rope_cope", "relative_cope")]
    + [pytest.param(p, "cpu", marks=cpu_blocks) for p in ("cope", "cope_sepkeys", "rope_cope")],
)
def test_model_fast_path_equals_reference_path(position, impl):
    ids = torch.randint(0, 23, (2, 40))
    models = {}
    for which in ("reference", impl):
        torch.manual_seed(1)
        models[which] = tiny_model(position, position_options={"impl": which, "npos_max": 8}).double()
        with torch.no_grad():  # non-zero CoPE tables, so the position term matters
            for name, p in models[which].named_parameters():
                if "pos_emb" in name:
                    p.copy_(torch.randn_like(p))
    outs = {which: m(ids) for which, m in models.items()}
    torch.testing.assert_close(outs[impl], outs["reference"])
    for out in outs.values():
        out.square().mean().backward()
    ref_params = dict(models["reference"].named_parameters())
    for name, p in models[impl].named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, msg=name)


def count_chunked_calls(monkeypatch):
    """Every call of the chunked op (either kind of blocks) from now on, as its keyword arguments."""
    calls = []
    real = dispatch_module.cope_attention_chunked
    monkeypatch.setattr(dispatch_module, "cope_attention_chunked", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def calls_dropout(calls):
    return [kw["dropout_p"] for kw in calls]


@pytest.mark.parametrize("position", ["cope", "rope_cope", "relative_cope"])
def test_default_impl_runs_the_chunked_op_on_cpu(monkeypatch, position):
    calls = count_chunked_calls(monkeypatch)
    model = tiny_model(position)
    model(torch.randint(0, 23, (1, EXPLICIT_ROWS + 1)))
    assert len(calls) == 2  # one per layer
    assert resolve_cope_impl("auto", torch.device("cpu")) in ("chunked", "cpu")  # cpu: its C++ blocks
    calls.clear()
    cache = model.new_cache()
    model(torch.randint(0, 23, (1, EXPLICIT_ROWS + 4)), cache=cache)  # a prefill takes the op,
    model(torch.randint(0, 23, (1, 1)), cache=cache)  # a decode step its one row of explicit logits
    assert len(calls) == 2


def test_reference_impl_takes_the_reference_path(monkeypatch):
    calls = count_chunked_calls(monkeypatch)
    tiny_model("cope", position_options={"impl": "reference"})(torch.randint(0, 23, (1, EXPLICIT_ROWS + 1)))
    assert not calls


@pytest.mark.parametrize("position", ["cope", "rope_cope", "relative_cope"])
def test_attention_dropout_runs_in_the_chunked_op(monkeypatch, position):
    # The paper-scale model configs all train with dropout 0.1: they must not fall back to O(T^2) memory.
    calls = count_chunked_calls(monkeypatch)
    model = tiny_model(position, dropout=0.1).train()
    tokens = torch.randint(0, 23, (2, EXPLICIT_ROWS + 1))
    first = model(tokens)
    assert len(calls) == 2 and calls_dropout(calls) == [0.1, 0.1]
    assert not torch.equal(first, model(tokens))  # new masks each call
    model.eval()
    assert torch.equal(model(tokens), model(tokens)) and calls_dropout(calls)[-1] == 0.0


def test_unknown_impl_is_one_clear_error():
    with pytest.raises(
        ValueError, match=r"impl must be one of \['auto', 'reference', 'chunked', 'cpu', 'triton'\], got 'fast'"
    ):
        tiny_model("rope_cope", position_options={"impl": "fast"})


@pytest.mark.parametrize("sep_keys", [False, True])
def test_dropout_keeps_reference_probabilities_scaled_and_drops_about_p(sep_keys):
    op = functools.partial(cope_attention_chunked, block_size=8)
    inputs = dropout_inputs(t=40, s=48, d=48, sep_keys=sep_keys)
    err, dropped = check_dropout_semantics(op, inputs, p=0.3, seed=5, dtype=torch.float64)
    assert err < 1e-10
    assert 0.2 < dropped < 0.4  # 2 x 2 x 1,140 causal entries; a wrong mask rate shows


@pytest.mark.parametrize("sep_keys", [False, True])
def test_dropout_gradients_match_reference_with_the_same_mask(sep_keys):
    op = functools.partial(cope_attention_chunked, block_size=8)
    inputs = dropout_inputs(t=21, s=30, d=32, sep_keys=sep_keys)
    for name, err, scale in compare_with_masked_reference(op, inputs, p=0.25, seed=11, dtype=torch.float64):
        assert err <= 1e-9 * scale + 1e-10, f"{name}: error {err:.2e} for values up to {scale:.2e}"


def test_dropout_masks_follow_the_seed():
    q, k, v, e, _ = dropout_inputs(t=16, s=16, d=16, sep_keys=False)
    first, again = (cope_attention_chunked(q, k, v, e, dropout_p=0.5, dropout_seed=3) for _ in range(2))
    other = cope_attention_chunked(q, k, v, e, dropout_p=0.5, dropout_seed=4)
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="dropout must be in"):
        cope_attention_chunked(q, k, v, e, dropout_p=1.0)


def test_blocks_are_even_so_no_block_is_a_stray_row():
    # T = 129 used to run as 64 + 64 + 1 rows: the last block paid a whole block's op overhead for one query.
    assert block_rows(129) == 26 and block_rows(128) == 32 and block_rows(1024) == MAX_BLOCK_ROWS
    for t in range(1, 600):
        rows, fewest = block_rows(t), math.ceil(t / max(16, min(t // 4, MAX_BLOCK_ROWS)))
        assert rows <= max(16, min(t // 4, MAX_BLOCK_ROWS)) and math.ceil(t / rows) == fewest
        assert fewest * rows - t < fewest  # the last block is short by less than one row per block


@pytest.mark.parametrize("elements", [1, 150, 400, 1 << 17])  # one head, a divisor of H, whole batches, all
def test_head_groups_cover_every_head_once(monkeypatch, elements):
    monkeypatch.setattr(chunked_module, "GROUP_ELEMENTS", elements)
    for b, h, n, end in [(3, 6, 5, 10), (1, 4, 8, 8), (5, 1, 3, 40)]:
        groups = list(chunked_module.head_groups(b, h, n, end))
        covered = [i for g, _ in groups for i in range(b * h)[g]]
        assert covered == list(range(b * h))
        for g, h0 in groups:
            size = g.stop - g.start
            assert h0 == g.start % h and (size % h == 0 or (h % size == 0 and h0 + size <= h))


@pytest.mark.parametrize("elements", [1, 100, 1 << 17])
def test_head_groups_give_the_reference_result(monkeypatch, elements):
    # Groups smaller than H heads, whole batches, and everything at once, with every optional term.
    monkeypatch.setattr(chunked_module, "GROUP_ELEMENTS", elements)
    q, k, v, e, gk, r = make_inputs(3, 4, 12, 15, 8, 6, torch.float64, sep_keys=True, rel=5)
    bias = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    distance = (torch.arange(12).unsqueeze(1) + 3 - torch.arange(15)).clamp(0, 6)

    def explicit(q, k, v, e, gk, r, bias):
        return reference_with_relative(q, k, v, e, gk, r, extra=bias[:, distance])

    inputs, weights = [q, k, v, e, gk, r, bias], torch.randn(3, 4, 12, 8, dtype=torch.float64)
    ref = output_and_grads(explicit, inputs, weights)
    fast = output_and_grads(lambda *a: cope_attention_chunked(*a[:6], bias=a[6], block_size=5), inputs, weights)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def count_forward_backward(inputs, target: str) -> OpCounter:
    """One counter over the chunked op's forward and backward with the block sizes of `target`."""
    forward, backward = count_layer(inputs, target)
    forward.ops += backward.ops
    forward.largest = max(forward.largest, backward.largest)
    return forward


def test_the_cuda_policy_launches_few_ops():
    # One layer of the WikiText-103 model's heads at a smaller batch and length (docs/benchmarks.md counts the
    # full shape): budget-sized blocks dispatch several times fewer ops than cache-sized ones.
    inputs = make_inputs(2, 12, 256, 256, 64, 64, torch.float32)[:4]
    cuda, cpu = count_forward_backward(inputs, "cuda"), count_forward_backward(inputs, "cpu")
    assert cuda.ops <= 200 and cpu.ops >= 5 * cuda.ops


def test_the_cuda_policy_keeps_every_block_tensor_within_its_budget(monkeypatch):
    # Values per (heads, rows, keys) tensor; the widest of them (int64 positions, complex pairs) take 8 bytes each.
    budget = 2 * 4 * 32 * 128  # (B*H, 32 rows, 128 keys)
    monkeypatch.setattr(chunked_module, "CUDA_GROUP_ELEMENTS", budget)
    inputs = make_inputs(2, 4, 128, 128, 16, 8, torch.float32, sep_keys=True)[:5]
    whole = count_forward_backward(inputs, "cuda").largest
    assert budget * 4 <= whole <= budget * 8
    monkeypatch.setattr(chunked_module, "CUDA_GROUP_ELEMENTS", budget // 8)  # below 16 rows: groups of heads
    assert block_rows(128, chunked_module.block_policy(torch.device("cuda")), 8, 128) == 16
    assert count_forward_backward(inputs, "cuda").largest <= whole // 2


@pytest.mark.parametrize("sep_keys", [False, True])
def test_the_cuda_policy_is_as_exact(sep_keys):
    inputs = make_inputs(2, 3, 37, 45, 8, 5, torch.float64, sep_keys, rel=4)
    weights = torch.randn(2, 3, 37, 8, dtype=torch.float64)
    ref = output_and_grads(lambda *a: reference_with_relative(*a), inputs, weights)
    with target_device("cuda"):
        fast = output_and_grads(lambda q, k, v, e, gk, r: cope_attention_chunked(q, k, v, e, gk, r), inputs, weights)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class ProductDtypes(TorchDispatchMode):
    """The input dtypes of every batched matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            self.seen.append({a.dtype for a in args if isinstance(a, torch.Tensor)})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_the_cuda_policy_takes_bfloat16_products_within_bfloat16_error(dropout_p):
    # Under the CUDA policy, bfloat16 inputs keep the products that read a block's dropped probabilities or
    # logits' gradient in bfloat16, as a flash kernel does; logits, gates, positions and softmax stay in float32.
    q, k, v, e = make_inputs(2, 3, 70, 70, 16, 12, torch.float32)[:4]
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v, e)]
    exact_inputs = [x.detach().float().requires_grad_() for x in half]  # the same values in float32
    weights = torch.randn(2, 3, 70, 16)

    def op(*a):
        return cope_attention_chunked(*a, dropout_p=dropout_p, dropout_seed=7)

    with target_device("cuda"), ProductDtypes() as products:
        mixed = output_and_grads(op, half, weights)
    with target_device("cuda"):  # the same blocks, so the same dropout masks
        exact = output_and_grads(op, exact_inputs, weights)
    assert {torch.bfloat16} in products.seen and {torch.float32} in products.seen  # logits stay in float32
    for name, a, b in zip(["out", "dq", "dk", "dv", "de"], mixed, exact):
        err, scale = (a.float() - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-2 * scale, f"{name}: error {err:.2e} for values up to {scale:.2e}"


def test_the_cuda_policy_moves_few_bytes_per_query_key_value():
    # One layer at a smaller batch and length, bf16-mixed inputs and attention dropout 0.1 (the LM configs), costed
    # as `cope-pl plan` costs a step: bytes moved per (query, key) value the blocks form, forward and backward
    # (docs/benchmarks.md quotes the full shape). The passes before they were cut moved 166 and 345.
    from cope_pl.bench.chunked_costs import block_values, layer_costs

    phases = layer_costs((2, 12, 256, 64), 64, torch.bfloat16, 0.1)
    values = block_values(2, 12, 256, "cuda")
    assert values == 2 * 12 * 256 * 256  # one block of all 256 rows at this size
    assert phases["forward"].bytes <= 140 * values and phases["backward"].bytes <= 290 * values
