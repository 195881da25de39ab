"""CoPE statistics: exact on hand-built gates, the model's own gates in every CoPE variant, and logged under cope/."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cope_pl.cli import main
from cope_pl.cope_stats import cope_statistics, gate_statistics
from cope_pl.ops import causal_mask
from tests.conftest import tiny_model
from tests.test_cli import FIT


def hand_built(value: float, t: int = 10) -> torch.Tensor:
    return torch.full((1, 2, t, t), value, dtype=torch.float64) * causal_mask(t, t)


def test_all_gates_one_count_every_key_so_the_clamped_fraction_is_known():
    # p_ij = i - j + 1; with npos_max 4 the clamp (p > 3) takes every pair with i - j >= 3: 28 of the 55 pairs.
    stats = gate_statistics(hand_built(1.0), npos_max=4)
    torch.testing.assert_close(stats["clamped_frac"], torch.full((2,), 28 / 55, dtype=torch.float64))
    torch.testing.assert_close(stats["mean_gate"], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(stats["mean_farthest"], torch.full((2,), 5.5, dtype=torch.float64))  # p_i0 = i + 1
    torch.testing.assert_close(stats["max_farthest"], torch.full((2,), 10.0, dtype=torch.float64))
    assert stats["gate_entropy"].max() < 1e-9
    assert (gate_statistics(hand_built(1.0), npos_max=11)["clamped_frac"] == 0).all()  # p <= 10 = npos_max - 1


def test_half_gates_have_maximal_entropy_and_half_the_positions():
    stats = gate_statistics(hand_built(0.5), npos_max=4)  # p_ij = (i - j + 1) / 2 > 3 when i - j >= 6: 10 pairs
    torch.testing.assert_close(stats["clamped_frac"], torch.full((2,), 10 / 55, dtype=torch.float64))
    torch.testing.assert_close(stats["gate_entropy"], torch.full((2,), math.log(2), dtype=torch.float64))


@pytest.mark.parametrize("position", ["cope", "cope_sepkeys", "rope_cope", "relative_cope"])
def test_every_cope_variant_reports_its_layers_whatever_op_it_runs(position):
    stats = {}
    for impl in ("chunked", "reference"):
        model = tiny_model(position, position_options={"impl": impl, "npos_max": 4})
        torch.manual_seed(1)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.3)
        stats[impl] = cope_statistics(model, torch.randint(0, 23, (2, 16)))
    assert [s["layer"] for s in stats["chunked"]] == [0, 1]
    for chunked, reference in zip(stats["chunked"], stats["reference"]):
        torch.testing.assert_close(chunked["clamped_frac"], reference["clamped_frac"])
        assert chunked["positions"].numel() == 2 * 4 * 16 * 17 // 2 and chunked["positions"].max() <= 3
    assert cope_statistics(tiny_model("rope"), torch.randint(0, 23, (1, 8))) == []


def cope_tags(run):
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0}).Reload()
    return [t for t in events.Tags()["scalars"] if t.startswith("cope/")], events.Tags()["histograms"]


def test_validation_logs_cope_statistics_and_results_keep_the_worst_clamp(tmp_path):
    main([*FIT, "--model.position=cope", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    run = tmp_path / "copy-cope" / "version_0"
    scalars, histograms = cope_tags(run)
    assert "cope/clamped_frac/layer0/head0" in scalars and "cope/mean_gate/layer1/head3" in scalars
    assert "cope/positions/layer1" in histograms
    metrics = json.loads((run / "results.json").read_text())["metrics"]
    assert 0 <= metrics["cope/max_clamped_frac"] <= 1


def test_the_statistics_are_off_with_one_flag(tmp_path):
    main(
        [*FIT, "--model.position=cope", "--cope_stats.enabled=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    run = tmp_path / "copy-cope" / "version_0"
    assert cope_tags(run) == ([], [])
    assert "cope/max_clamped_frac" not in json.loads((run / "results.json").read_text())["metrics"]
