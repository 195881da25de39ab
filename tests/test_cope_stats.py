"""CoPE statistics: exact on hand-built gates, the model's own gates in every CoPE variant, the same values as
the whole-tensor computation they replace, and logged under val_cope/ (per layer; per head on request)."""

import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import make_histogram

from cope_pl.cli import main
from cope_pl.cope_stats import STATISTICS, LayerStatistics, cope_statistics, gate_statistics
from cope_pl.ops import causal_mask
from tests.conftest import tiny_model
from tests.test_cli import FIT

SATURATED = 60.0  # a gate logit whose sigmoid is 1 in float32 and float64


def hand_built(logit: float, t: int = 10) -> torch.Tensor:
    """(1, 2, T, T) gate logits, -inf on masked keys."""
    return torch.full((1, 2, t, t), logit).masked_fill(~causal_mask(t, t), float("-inf"))


def test_all_gates_one_count_every_key_so_the_clamped_fraction_is_known():
    # p_ij = i - j + 1; with npos_max 4 the clamp (p > 3) takes every pair with i - j >= 3: 28 of the 55 pairs.
    stats = gate_statistics(hand_built(SATURATED), npos_max=4)
    torch.testing.assert_close(stats["clamped_frac"], torch.full((2,), 28 / 55, dtype=torch.float64))
    torch.testing.assert_close(stats["mean_gate"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(stats["mean_farthest"], torch.full((2,), 5.5, dtype=torch.float64))  # p_i0 = i + 1
    torch.testing.assert_close(stats["max_farthest"], torch.full((2,), 10.0, dtype=torch.float64))
    assert stats["gate_entropy"].max() < 1e-9
    assert (gate_statistics(hand_built(SATURATED), npos_max=11)["clamped_frac"] == 0).all()  # p <= 10


def test_half_gates_have_maximal_entropy_and_half_the_positions():
    stats = gate_statistics(hand_built(0.0), npos_max=4)  # p_ij = (i - j + 1) / 2 > 3 when i - j >= 6: 10 pairs
    torch.testing.assert_close(stats["clamped_frac"], torch.full((2,), 10 / 55, dtype=torch.float64))
    torch.testing.assert_close(stats["gate_entropy"], torch.full((2,), math.log(2), dtype=torch.float64))


def whole_tensor_statistics(model, input_ids):
    """The computation the block-wise statistics replace, kept as the oracle: every layer's (B, H, T, S) gates
    recorded at once, in float64, and all causal positions for the histogram."""
    layers = []
    for layer, record in enumerate(model.record_attention(input_ids)):
        if record["gates"] is None:
            continue
        gates = record["gates"].double()
        npos_max = int(record["npos_max"])
        t, s = gates.shape[-2:]
        mask = causal_mask(t, s).to(gates.dtype)
        pairs = mask.sum() * gates.size(0)
        positions = gates.flip(-1).cumsum(-1).flip(-1)
        g = gates.clamp(1e-12, 1 - 1e-12)
        entropy = -(g * g.log() + (1 - g) * (1 - g).log()) * mask
        farthest = positions[..., 0]
        stats = {
            "mean_gate": (gates * mask).sum((0, 2, 3)) / pairs,
            "clamped_frac": ((positions > npos_max - 1).to(gates.dtype) * mask).sum((0, 2, 3)) / pairs,
            "mean_farthest": farthest.mean((0, 2)),
            "max_farthest": farthest.amax((0, 2)),
            "gate_entropy": entropy.sum((0, 2, 3)) / pairs,
        }
        stats["positions"] = record["positions"][causal_mask(t, s).expand_as(gates)].float()
        layers.append({**stats, "layer": layer})
    return layers


@pytest.mark.parametrize("position", ["cope", "cope_sepkeys", "rope_cope", "relative_cope"])
def test_block_wise_statistics_equal_the_whole_tensor_ones(tmp_path, position):
    model = tiny_model(position, n_layers=3, position_options={"npos_max": 6})
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tokens = torch.randint(0, 23, (3, 40))
    edges = SummaryWriter(tmp_path).default_bins
    expected = whole_tensor_statistics(model, tokens)
    got = cope_statistics(model, tokens, edges, block_elements=3 * 4 * 40 * 7)  # blocks of 7 queries: 6 blocks
    assert [s["layer"] for s in got] == [s["layer"] for s in expected] == [0, 1, 2]
    for new, old in zip(got, expected):
        for name in STATISTICS:
            assert new[name].dtype == torch.float64
            torch.testing.assert_close(new[name], old[name], rtol=1e-5, atol=1e-6, msg=name)
        assert old["clamped_frac"].max() > 0  # the clamp is exercised
        hist, whole = new["positions"], make_histogram(old["positions"].numpy().astype(float), edges)
        limits, counts = hist.buckets()
        assert hist.num == whole.num == 3 * 4 * 40 * 41 // 2
        assert (hist.min, hist.max) == pytest.approx((whole.min, whole.max), rel=1e-6)
        assert (hist.sum, hist.sum_squares) == pytest.approx((whole.sum, whole.sum_squares), rel=1e-5)
        assert limits == list(whole.bucket_limit)
        # A position within float rounding of a bin edge may fall on its other side: a handful at most.
        assert np.abs(np.subtract(counts, whole.bucket)).sum() <= 4


def test_a_model_without_a_cope_term_runs_nothing(monkeypatch):
    model = tiny_model("rope")
    monkeypatch.setattr(model, "forward", lambda *a, **kw: pytest.fail("a forward ran"))
    assert cope_statistics(model, torch.randint(0, 23, (1, 8))) == []


def test_the_block_holds_at_most_block_elements_per_tensor(monkeypatch):
    seen = []
    real = LayerStatistics.add
    monkeypatch.setattr(LayerStatistics, "add", lambda self, logits, valid: seen.append(logits.numel()) or real(
        self, logits, valid))  # fmt: skip
    model = tiny_model("cope", position_options={"npos_max": 4})
    cope_statistics(model, torch.randint(0, 23, (2, 64)), block_elements=2 * 4 * 64 * 16)
    assert len(seen) == 2 * 4 and max(seen) <= 2 * 4 * 64 * 16  # 4 blocks of 16 queries per layer


def cope_tags(run):
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    return [t for t in events.Tags()["scalars"] if t.startswith("val_cope/")], events.Tags()["histograms"]


def custom_layout(run) -> dict[str, list[str]]:
    """The custom-scalars layout a run registered: chart title -> the tag patterns of its lines."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload()
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def test_validation_logs_cope_statistics_per_layer_and_results_keep_the_worst_clamp(tmp_path):
    main([*FIT, "--model.position=cope", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    run = tmp_path / "copy-cope" / "version_0"
    scalars, histograms = cope_tags(run)
    assert sorted(scalars) == sorted(
        [f"val_cope/{name}/layer{layer}" for name in STATISTICS for layer in (0, 1)] + ["val_cope/max_clamped_frac"]
    )  # one card per statistic and layer, none per head
    assert "val_cope/positions/layer1" in histograms
    assert min(scalars) > "val/" and "val/" > "train/"  # TensorBoard sorts the curves a reader came for first
    charts = custom_layout(run)
    assert charts["mean_gate, layers"] == [r"^val_cope/mean_gate/layer\d+$"]  # a line per layer, one chart
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert 0 <= metrics["val_cope/max_clamped_frac"] <= 1
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("val_cope/mean_gate/layer0")] == [e.step for e in events.Scalars("val/loss")]


def test_per_head_statistics_are_an_option_drawn_as_one_chart_per_layer(tmp_path):
    main(
        [*FIT, "--model.position=cope", "--cope_stats.per_head=true", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    run = tmp_path / "copy-cope" / "version_0"
    scalars, _ = cope_tags(run)
    assert "val_cope/clamped_frac/layer0/head0" in scalars and "val_cope/mean_gate/layer1/head3" in scalars
    charts = custom_layout(run)
    assert charts["gate_entropy, layer 1 heads"] == [r"^val_cope/gate_entropy/layer1/head\d+$"]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
    heads = [events.Scalars(f"val_cope/mean_gate/layer0/head{h}")[-1].value for h in range(4)]
    assert events.Scalars("val_cope/mean_gate/layer0")[-1].value == pytest.approx(np.mean(heads), rel=1e-5)


def test_the_statistics_are_off_with_one_flag(tmp_path):
    main(
        [*FIT, "--model.position=cope", "--cope_stats.enabled=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    run = tmp_path / "copy-cope" / "version_0"
    assert cope_tags(run) == ([], [])
    assert "val_cope/max_clamped_frac" not in json.loads((run / "results.json").read_text())["metrics"]
