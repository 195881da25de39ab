"""RoPE scaling at evaluation (linear, dynamic NTK, YaRN) against the formulas computed here pair by pair, factor 1
as the identity, and eval-context / passkey rows that carry and report it."""

import math

import pandas as pd
import pytest
import torch

from cope_pl.eval_context import evaluate_context
from cope_pl.eval_passkey import evaluate_passkey
from cope_pl.position.rope_scaling import RopeScaling, apply_rope_scaling
from cope_pl.reporting.collect import load_eval_context, load_passkey
from cope_pl.reporting.tables import extrapolation_table, passkey_table
from tests.conftest import fitted_run, tiny_model


def plain(base, dim):
    return [base ** (-2 * c / dim) for c in range(dim // 2)]


def yarn_by_hand(base, dim, factor, original, beta_fast=32.0, beta_slow=1.0):
    """YaRN per frequency pair c: the pair turns L * inv_freq_c / (2 pi) times over the training length L.
    Pairs below index `low` (turning more than beta_fast times) keep their frequency, pairs from `high` on
    (fewer than beta_slow turns) are divided by the factor, a linear ramp in c between; mscale 0.1 ln(s) + 1."""

    def index_turning(times):  # solve L * base^(-2c/dim) / (2 pi) = times for c
        return math.log(original / (2 * math.pi * times)) / math.log(base) * dim / 2

    low, high = max(math.floor(index_turning(beta_fast)), 0), min(math.ceil(index_turning(beta_slow)), dim - 1)
    out = []
    for c, freq in enumerate(plain(base, dim)):
        interpolate = min(max((c - low) / (high - low), 0.0), 1.0)
        out.append(freq * (1 - interpolate) + freq / factor * interpolate)
    return out, 1 + 0.1 * math.log(factor)


def test_yarn_keeps_fast_pairs_interpolates_slow_ones_and_sets_the_temperature():
    dim, base, original, factor = 64, 10000.0, 256, 4.0
    inv_freq, scale = RopeScaling("yarn", factor, original).frequencies(base, dim, seq_len=4 * original)
    expected, expected_scale = yarn_by_hand(base, dim, factor, original)
    torch.testing.assert_close(inv_freq, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert scale == pytest.approx(expected_scale) and scale == pytest.approx(1.1386294361)
    turns = [original * f / (2 * math.pi) for f in plain(base, dim)]
    for c, t in enumerate(turns):
        if t > 32 * 1.2:
            assert inv_freq[c].item() == pytest.approx(plain(base, dim)[c])
        if t < 1 / 1.2:
            assert inv_freq[c].item() == pytest.approx(plain(base, dim)[c] / factor)


def test_dynamic_ntk_raises_the_base_only_past_the_training_length():
    dim, base, original, factor = 16, 10000.0, 128, 2.0
    scaling = RopeScaling("dynamic", factor, original)
    for seq_len in (1, 128):
        torch.testing.assert_close(scaling.frequencies(base, dim, seq_len)[0], torch.tensor(plain(base, dim)).double())
    new_base = base * (factor * 384 / original - factor + 1) ** (dim / (dim - 2))  # 10000 * 5 ** (16 / 14)
    inv_freq, scale = scaling.frequencies(base, dim, 384)
    torch.testing.assert_close(inv_freq, torch.tensor(plain(new_base, dim), dtype=torch.float64))
    assert scale == 1.0 and inv_freq[0] == 1.0 and inv_freq[-1] < plain(base, dim)[-1]


def test_linear_rotates_position_factor_times_p_as_plain_rope_rotates_p():
    model = tiny_model("rope").double()
    same_vector = torch.randn(1, 4, 1, 8, dtype=torch.float64).expand(-1, -1, 24, -1)  # one q at every position
    unscaled, _ = model.position.transform_qk(0, same_vector, same_vector)
    apply_rope_scaling(model, "linear", 3.0, 8)
    scaled, _ = model.position.transform_qk(0, same_vector, same_vector)
    torch.testing.assert_close(scaled[:, :, [0, 3, 6, 9]], unscaled[:, :, [0, 1, 2, 3]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(scaled[:, :, 1], unscaled[:, :, 1])


@pytest.mark.parametrize("rope_type, length", [("linear", 200), ("yarn", 200), ("dynamic", 16)])
def test_factor_one_leaves_the_model_as_it_is(rope_type, length):
    model = tiny_model("rope_cope", max_seq_len=256).eval()
    with torch.no_grad():
        model.position.parts[1].pos_emb.normal_()
    ids = torch.randint(0, 23, (1, length))
    with torch.no_grad():
        before = model(ids)
        apply_rope_scaling(model, rope_type, 1.0, 16)
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "position, rope_type, factor, message",
    [
        ("cope", "yarn", 4.0, "needs a model with RoPE, but model.position 'cope' has none"),
        ("xpos", "yarn", 4.0, "needs a model with RoPE"),
        ("rope", "ntk", 4.0, "unknown rope_type 'ntk'"),
        ("rope", "linear", 0.5, "--rope-factor must be >= 1"),
    ],
)
def test_bad_scaling_is_one_clear_error(position, rope_type, factor, message):
    with pytest.raises(ValueError, match=message):
        apply_rope_scaling(tiny_model(position), rope_type, factor, 16)


def runs_frame(run, position):
    return pd.DataFrame([{"run_dir": str(run), "position": position, "seed": 0, "status": "ok"}])


def test_eval_context_keeps_scaled_rows_beside_plain_ones_and_the_report_labels_them(tmp_path):
    data = {"seq_len": 8, "batch_size": 16, "num_symbols": 6, "eval_size": 32}
    run = fitted_run(tmp_path, "copy-rope", "cope_pl.data.CopyDataModule", data, "rope", max_seq_len=32)[0]
    plain_rows = evaluate_context(run, ["1x", "2x"], device="cpu")
    scaled = evaluate_context(run, ["1x", "2x"], device="cpu", rope_scaling="yarn", rope_factor=2)
    assert {r["rope_scaling"] for r in plain_rows} == {""} and {r["rope_scaling"] for r in scaled} == {"yarn×2"}
    assert scaled[1]["loss"] != plain_rows[1]["loss"]
    runs = runs_frame(run, "rope")
    ec = load_eval_context(runs)
    assert len(ec) == 4
    table = extrapolation_table(ec, runs, "loss", ["position"], "copy")
    assert table.rows == ["rope", "rope+yarn×2"]
    assert table.mean[("rope+yarn×2", "16")] == pytest.approx(scaled[1]["loss"])
    assert table.n[("rope+yarn×2", "16")] == table.expected[("rope+yarn×2", "16")] == 1
    with pytest.raises(ValueError, match="--rope-scaling yarn needs --rope-factor"):
        evaluate_context(run, ["1x"], device="cpu", rope_scaling="yarn")


def test_passkey_rows_carry_the_scaling_and_get_a_row_of_their_own(tmp_path):
    data = {"seq_len": 16, "batch_size": 8, "key_len": 3, "depths": [0.5], "eval_size": 4, "train_size": 32}
    run = fitted_run(tmp_path, "passkey-rope", "cope_pl.data.PasskeyDataModule", data, "rope", max_seq_len=64)[0]
    evaluate_passkey(run, ["1x", "2x"], device="cpu")
    evaluate_passkey(run, ["2x"], device="cpu", rope_scaling="dynamic", rope_factor=2)
    runs = runs_frame(run, "rope")
    passkey = load_passkey(runs)
    assert sorted(passkey["position"]) == ["rope", "rope", "rope+dynamic×2"]
    table = passkey_table(passkey, runs, "accuracy", ["position"], "passkey")
    assert table.rows == ["rope", "rope+dynamic×2"] and table.n[("rope+dynamic×2", "32")] == 1
