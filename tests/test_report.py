"""Reports built from run directories the tests write themselves: known numbers in, known tables out."""

import json
import math

import pandas as pd
import pytest
import yaml

from cope_pl.report import build_report
from cope_pl.reporting.collect import load_runs
from cope_pl.reporting.tables import metric_table

ERRORS = {  # position -> seed -> (test/error@in_dist, test/error@ood)
    "rope": {0: (0.10, 0.50), 1: (0.20, 0.70)},
    "cope": {0: (0.00, 0.10), 1: (0.02, 0.30)},
}


def write_run(run_dir, position, seed, errors, eval_rows=None):
    run_dir.mkdir(parents=True)
    config = {"seed_everything": seed, "model": {"position": position}, "data": {"init_args": {"seq_len": 32}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"test/error@in_dist": errors[0], "test/error@ood": errors[1], "test/error": errors[0]}
    results = {"model": {"position": position}, "data": {"class": "TaskDataModule", "seq_len": 32}}
    (run_dir / "results.json").write_text(
        json.dumps({**results, "global_step": 10, "fit_finished": True, "metrics": metrics})
    )
    if eval_rows is not None:
        (run_dir / "eval_context.json").write_text(json.dumps(eval_rows))


def write_sweep(root, with_missing=True):
    """Two encodings x two seeds, plus (optionally) a third encoding whose cells never ran."""
    save_dir = root / "sweeps" / "demo"
    cells = []
    for position, seeds in ERRORS.items():
        for seed, errors in seeds.items():
            name = f"{position}-seed{seed}"
            write_run(save_dir / name / "version_0", position, seed, errors)
            cells.append({"name": name, "keys": {"position": position, "seed": f"seed{seed}"}})
    if with_missing:
        cells.append({"name": "alibi-seed0", "keys": {"position": "alibi", "seed": "seed0"}})
    manifest = {"name": "demo", "axes": ["position", "seed"], "report": {}, "cells": cells}
    (save_dir / "sweep.json").write_text(json.dumps(manifest))
    return save_dir


def test_runs_load_one_row_each_with_swept_keys(tmp_path):
    write_sweep(tmp_path)
    runs = load_runs(tmp_path)
    assert len(runs) == 5
    assert set(runs["sweep"]) == {"demo"}
    ok = runs[runs["status"] == "ok"].set_index("cell")
    assert ok.loc["cope-seed1", "test/error@ood"] == 0.30 and ok.loc["cope-seed1", "seed"] == 1


def test_table_gives_mean_and_std_over_seeds(tmp_path):
    write_sweep(tmp_path, with_missing=False)
    table = metric_table(load_runs(tmp_path), "test/error", ["position"], "demo")
    assert table.columns == ["in_dist", "ood"]  # one column per named test set
    assert table.mean[("rope", "ood")] == pytest.approx(0.60)
    assert table.std[("rope", "ood")] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert table.n[("cope", "in_dist")] == 2
    assert table.cell("cope", "ood") == "0.200 ± 0.141"


def test_best_value_is_bold_per_column(tmp_path):
    write_sweep(tmp_path, with_missing=False)
    table = metric_table(load_runs(tmp_path), "test/error", ["position"], "demo")
    markdown = table.markdown()
    assert "| cope | **0.010 ± 0.014** | **0.200 ± 0.141** |" in markdown
    assert "\\textbf{0.200 $\\pm$ 0.141}" in table.latex()


def test_missing_runs_are_reported_not_dropped(tmp_path):
    write_sweep(tmp_path)
    table = metric_table(load_runs(tmp_path), "test/error", ["position"], "demo")
    assert table.cell("alibi", "ood") == "missing"
    files = build_report(tmp_path, tmp_path / "reports")
    assert tmp_path / "reports" / "demo" / "missing.csv" in files
    missing = pd.read_csv(tmp_path / "reports" / "demo" / "missing.csv")
    assert list(missing["run"]) == ["alibi-seed0/version_0"]
    assert "alibi-seed0/version_0: missing" in (tmp_path / "reports" / "demo" / "README.md").read_text()


def test_failed_cell_reason_comes_from_the_sweep_status(tmp_path):
    save_dir = write_sweep(tmp_path)
    (save_dir / "status").mkdir()
    status = {"status": "failed", "step": "fit", "log": "logs/alibi-seed0.log"}
    (save_dir / "status" / "alibi-seed0.json").write_text(json.dumps(status))
    runs = load_runs(tmp_path).set_index("cell")
    assert runs.loc["alibi-seed0", "status"] == "failed"
    assert "failed at fit" in runs.loc["alibi-seed0", "reason"]


def test_paper_numbers_become_reference_rows(tmp_path):
    write_sweep(tmp_path, with_missing=False)
    table = metric_table(
        load_runs(tmp_path), "test/error", ["position"], "demo", scale=100, digits=1, paper={"cope": {"ood": 4.9}}
    )
    assert "| cope (paper) |  | 4.9 |" in table.markdown()
    assert table.cell("cope", "ood") == "20.0 ± 14.1"  # scaled to percent


def ec_row(seq_len, status="ok", ppl=None, reason=""):
    return {"seq_len": seq_len, "set": "", "status": status, "reason": reason, "ppl": ppl, "train_seq_len": 32}


def test_report_writes_tables_and_figures_with_extrapolation_and_not_applicable(tmp_path):
    reason = "sequence of 64 tokens is longer than the learned absolute position table"
    root = tmp_path / "runs"
    write_run(
        root / "a" / "version_0", "absolute", 0, (0.1, 0.2), [ec_row(32, ppl=3.0), ec_row(64, "n/a", None, reason)]
    )
    write_run(root / "c" / "version_0", "cope", 0, (0.1, 0.2), [ec_row(32, ppl=2.5), ec_row(64, ppl=2.75)])
    files = build_report(root, tmp_path / "out")
    out = tmp_path / "out" / "runs"
    for name in ("test_error.csv", "test_error.md", "test_error.tex", "extrapolation.md", "extrapolation.png"):
        assert out / name in files and (out / name).stat().st_size > 0
    assert (out / "learning_curves.png").is_file() and (out / "error_by_set.png").is_file()
    extrapolation = (out / "extrapolation.md").read_text()
    assert "| absolute | 3.000 | n/a |" in extrapolation
    assert "| cope | **2.500** | **2.750** |" in extrapolation
    assert reason in extrapolation  # the reason is given under the table
    numbers = pd.read_csv(out / "extrapolation.csv").set_index("position")
    assert numbers.loc["cope", "64_mean"] == 2.75 and math.isnan(numbers.loc["absolute", "64_mean"])


def test_report_on_an_empty_directory_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs under"):
        build_report(tmp_path, tmp_path / "out")


def test_fit_logs_hparams_with_final_metrics_for_tensorboard(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from cope_pl.data import CopyDataModule
    from cope_pl.lm import LanguageModel
    from cope_pl.results import ResultsWriter

    dm = CopyDataModule(seq_len=8, batch_size=4, num_symbols=4, eval_size=8)
    model = LanguageModel(vocab_size=dm.vocab_size, n_layers=1, d_model=16, n_heads=2, position="cope")
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=logger,
        callbacks=[ResultsWriter()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert "val/loss" in [m.name.tag for m in experiment.metric_infos]
    assert session.session_start_info.hparams["model/position"].string_value == "cope"
