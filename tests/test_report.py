"""Reports built from run directories the tests write themselves: known numbers in, known tables out."""

import json
import math

import pandas as pd
import pytest
import yaml

from cope_pl.reporting.collect import load_eval_context_positions, load_runs
from cope_pl.reporting.plots import plot_bars, plot_extrapolation, plot_learning_curves, plot_loss_by_position
from cope_pl.reporting.report import build_report, report_group
from cope_pl.reporting.tables import Table, metric_table

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
    assert "| cope | 2.500 | 2.750 | 1 | 10 |" in extrapolation  # one seed each: no winner, n and step shown
    assert reason in extrapolation  # the reason is given under the table
    numbers = pd.read_csv(out / "extrapolation.csv").set_index("position")
    assert numbers.loc["cope", "64_mean"] == 2.75 and math.isnan(numbers.loc["absolute", "64_mean"])


def test_each_test_set_gets_its_own_extrapolation_table_named_by_its_set(tmp_path):
    # A task with several test sets (Flip-Flop's in_dist, ood_dense, ...): no set is silently left out or
    # shown under a title that does not name it.
    def rows(ppl_in, ppl_ood):
        in_dist = [{**ec_row(n, ppl=p), "set": "in_dist"} for n, p in zip((32, 64), ppl_in)]
        return in_dist + [{**ec_row(n, ppl=p), "set": "ood"} for n, p in zip((32, 64), ppl_ood)]

    root = tmp_path / "runs"
    write_run(root / "r" / "version_0", "rope", 0, (0.1, 0.2), rows((1.5, 9.0), (3.0, 12.0)))
    write_run(root / "c" / "version_0", "cope", 0, (0.1, 0.2), rows((1.4, 1.6), (2.0, 2.5)))
    build_report(root, tmp_path / "out")
    out = tmp_path / "out" / "runs"
    first, second = (out / "extrapolation.md").read_text(), (out / "extrapolation_ood.md").read_text()
    assert first.startswith("### runs: ppl by evaluation context length, in_dist")
    assert "| cope | 1.400 | 1.600 |" in first and "| rope | 1.500 | 9.000 |" in first  # n = 1: nothing bold
    assert second.startswith("### runs: ppl by evaluation context length, ood")
    assert "| cope | 2.000 | 2.500 |" in second and "| rope | 3.000 | 12.000 |" in second
    assert (out / "extrapolation_ood.png").is_file()
    assert "(extrapolation_ood.png)" in (out / "README.md").read_text()


def test_runs_of_different_data_outside_a_sweep_get_a_report_each(tmp_path):
    # A task run (named test sets) beside a language-model run (one unnamed set): one table would show the
    # LM's results as "missing" under the task's columns.
    root = tmp_path / "runs"
    write_run(root / "flipflop-cope" / "version_0", "cope", 0, (0.1, 0.2))
    lm = root / "wikitext-rope" / "version_0"
    write_run(lm, "rope", 0, (0.3, 0.3))
    results = json.loads((lm / "results.json").read_text())
    metrics = {"test/error": 0.8, "test/ppl": 169.0, "test/word_ppl": 7373.0}
    results["data"]["class"], results["metrics"] = "WikiTextDataModule", metrics
    (lm / "results.json").write_text(json.dumps(results))
    build_report(root, tmp_path / "out")
    task, text = tmp_path / "out" / "runs-task", tmp_path / "out" / "runs-wikitext"
    assert not (tmp_path / "out" / "runs").exists()
    assert "| cope | 0.100 | 0.200 | 1 | 10 |" in (task / "test_error.md").read_text()
    assert (text / "test_ppl.md").read_text().startswith("### runs-wikitext: test/ppl")
    assert "169.000" in (text / "test_ppl.md").read_text() and "missing" not in (text / "README.md").read_text()
    assert "7373.000" in (text / "test_word_ppl.md").read_text()  # the word-level table where words are counted
    assert not (task / "test_word_ppl.md").exists()


def test_a_test_set_of_another_data_module_is_not_applicable_not_missing(tmp_path):
    # One table over two data modules with different test sets (as a sweep with a data axis can make): each
    # row's cells outside its own sets are n/a with the reason, and a row without any result stays missing.
    root = tmp_path / "runs"
    write_run(root / "f" / "version_0", "cope", 0, (0.1, 0.2))  # sets in_dist, ood
    counting = root / "c" / "version_0"
    write_run(counting, "rope", 0, (0.3, 0.4))
    results = json.loads((counting / "results.json").read_text())
    results["metrics"] = {"test/error@in_dist": 0.3, "test/error@ood_long": 0.6}
    (counting / "results.json").write_text(json.dumps(results))
    runs = pd.concat([load_runs(root), pd.DataFrame([{"position": "alibi", "status": "missing"}])])
    table = metric_table(runs, "test/error", ["position"], "mixed")
    assert table.cell("cope", "ood_long") == "n/a" and table.cell("rope", "ood") == "n/a"
    assert table.cell("rope", "ood_long") == "0.600" and table.cell("alibi", "ood") == "missing"
    assert "n/a for rope at ood: not a test set of this data (its sets: in_dist, ood_long)" in table.markdown()


def test_a_table_in_percent_says_so_in_its_heading(tmp_path):
    write_run(tmp_path / "runs" / "c" / "version_0", "cope", 0, (0.1, 0.2))
    spec = {"title": "Demo task", "tables": [{"name": "test_error", "metric": "test/error", "scale": 100}]}
    report_group(load_runs(tmp_path / "runs"), tmp_path / "out", spec, None)
    assert (tmp_path / "out" / "test_error.md").read_text().startswith("### Demo task: test/error in %")


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


# Figures -------------------------------------------------------------------------------------------------
def table_of(rows, columns, values, row_name="train_len / position", **options):
    """A Table with given means (None = no result for that cell, std 0, one seed each)."""
    cells = {(r, c): values[r][i] for r in rows for i, c in enumerate(columns)}
    n = {k: int(v is not None) for k, v in cells.items()}
    mean = {k: (math.nan if v is None else v) for k, v in cells.items()}
    table = Table("demo", row_name, rows, columns, mean, dict.fromkeys(cells, 0.0), n, dict.fromkeys(cells, 1))
    for option, value in options.items():
        setattr(table, option, value)
    return table


@pytest.fixture
def drawn(monkeypatch):
    """Call a plot function and get its figure back (drawn, not closed)."""
    from cope_pl.reporting import plots

    plt = plots.pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))

    def draw(plot, *args, **kwargs):
        plot(*args, **kwargs)
        figures[-1].canvas.draw()
        return figures[-1]

    return draw


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_ylabel()]


def heading(fig) -> str:
    """The figure's heading on one line (it is wrapped to the panels' width)."""
    return " ".join(fig._suptitle.get_text().split())


PPL = {  # two encodings that coincide, one that cannot go past the training length
    "train128 / relative": [216.14, 216.16, 216.18],
    "train128 / relative_capped": [216.14, 216.16, 216.18],
    "train128 / absolute": [216.12, None, None],
}


def test_extrapolation_axes_show_plain_numbers_on_a_log_scale(tmp_path, drawn):
    fig = drawn(plot_extrapolation, table_of(list(PPL), ["128", "192", "256"], PPL), tmp_path / "e.png", "test/ppl")
    (ax,) = data_axes(fig)
    assert ax.get_yscale() == "log"
    for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_major_formatter().get_offset() == ""
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all("e" not in t for t in labels) and len(set(labels)) == len(labels)
    assert ax.get_ylabel() == "test perplexity (per token)"


def test_a_change_of_hundredths_of_a_perplexity_point_does_not_fill_the_axis(tmp_path, drawn):
    values = {"cope": [169.285, 169.280, 169.297]}
    fig = drawn(
        plot_extrapolation, table_of(list(values), ["128", "256", "512"], values), tmp_path / "e.png", "test/ppl"
    )
    (ax,) = data_axes(fig)
    low, high = ax.get_ylim()
    assert high / low >= 1.2  # the 0.01 % spread stays a flat line


def test_extrapolation_ticks_sit_at_the_evaluated_lengths_with_a_labelled_train_line(tmp_path, drawn):
    table = table_of(list(PPL), ["128", "192", "256"], PPL)
    fig = drawn(plot_extrapolation, table, tmp_path / "e.png", "test/ppl", dict.fromkeys(PPL, 128))
    (ax,) = data_axes(fig)
    assert list(ax.get_xticks()) == [128, 192, 256]
    vertical = [line for line in ax.lines if line.get_label() == "train length 128"]
    assert vertical and list(vertical[0].get_xdata()) == [128, 128]
    assert "train length 128" in [t.get_text().strip() for t in ax.texts]


def test_legend_names_encodings_and_coinciding_series_stay_apart(tmp_path, drawn):
    fig = drawn(plot_extrapolation, table_of(list(PPL), ["128", "192", "256"], PPL), tmp_path / "e.png", "test/ppl")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["relative", "relative_capped", "absolute"]
    (ax,) = data_axes(fig)
    series = {line.get_label(): line for line in ax.lines if line.get_label() in PPL_NAMES}
    a, b = series["relative"], series["relative_capped"]
    assert (a.get_marker(), a.get_linestyle()) != (b.get_marker(), b.get_linestyle())  # told apart by style
    assert list(a.get_xdata()) == list(b.get_xdata()) == [128, 192, 256]  # markers at their true lengths


def test_one_run_per_cell_draws_no_band_and_says_so(tmp_path, drawn):
    fig = drawn(plot_extrapolation, table_of(list(PPL), ["128", "192", "256"], PPL), tmp_path / "e.png", "test/ppl")
    (ax,) = data_axes(fig)
    assert not ax.collections  # no zero-width band
    assert "one run each, no spread" in heading(fig)


def test_a_narrow_seed_band_is_drawn_whole(tmp_path, drawn):
    values = {"cope": [169.3, 169.3, 169.4], "rope": [169.3, 169.3, 169.3]}
    table = table_of(list(values), ["128", "256", "512"], values, row_name="position")
    table.n, table.std = dict.fromkeys(table.n, 2), dict.fromkeys(table.std, 0.7)
    fig = drawn(plot_extrapolation, table, tmp_path / "e.png", "test/ppl")
    assert "mean over 2 seeds, band ±1 std" in heading(fig) and "cut" not in heading(fig)


def test_a_wide_seed_band_is_cut_at_the_axis_rather_than_flattening_the_lines(tmp_path, drawn):
    values = {"good": [20.0, 22.0, 30.0], "mixed": [25.0, 27.0, 40.0]}
    table = table_of(list(values), ["128", "256", "512"], values, row_name="position")
    table.n = dict.fromkeys(table.n, 3)
    table.std = {key: (500.0 if key[0] == "mixed" else 1.0) for key in table.std}  # runs of very different quality
    fig = drawn(plot_extrapolation, table, tmp_path / "e.png", "test/ppl")
    (ax,) = data_axes(fig)
    low, high = ax.get_ylim()
    assert low >= 10 and high <= 80  # the means' range, not the band's 1e-12 .. 540
    assert len(ax.collections) == 2 and "bands cut at the axis" in heading(fig)
    assert "mean over 3 seeds, band ±1 std" in heading(fig)


PPL_NAMES = {"relative", "relative_capped", "absolute"}


def test_each_data_set_gets_its_own_panel_with_a_y_label(tmp_path, drawn):
    values = {"flipflop / cope": [0.01, 0.2], "flipflop / rope": [0.02, 0.3], "counting / cope": [0.5, 0.9]}
    table = table_of(list(values), ["in_dist", "ood"], values, row_name="data / position", scale=100)
    fig = drawn(plot_bars, table, tmp_path / "b.png", "test/error")
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["counting", "flipflop"]  # sorted by name
    assert all(ax.get_ylabel() == "test error (%)" for ax in axes)


def test_error_bars_are_in_percent_and_a_missing_cell_is_no_bar(tmp_path, drawn):
    values = {"cope": [0.0, 0.25], "alibi": [0.5, None]}
    table = table_of(list(values), ["in_dist", "ood"], values, row_name="position", scale=100)
    fig = drawn(plot_bars, table, tmp_path / "b.png", "test/error")
    (ax,) = data_axes(fig)
    heights = {b.get_label(): [r.get_height() for r in b] for b in ax.containers if hasattr(b, "patches")}
    assert heights == {"cope": [0.0, 25.0], "alibi": [50.0]}  # the true 0 % is a bar; the missing cell is not
    assert "missing" in [t.get_text() for t in ax.texts]
    assert ax.yaxis.get_major_formatter().get_offset() == ""


def test_bars_of_one_run_have_no_error_bars_and_say_so(tmp_path, drawn):
    from matplotlib.container import ErrorbarContainer

    values = {"cope": [169.3], "rope": [170.1]}
    fig = drawn(
        plot_bars, table_of(list(values), ["test"], values, row_name="position"), tmp_path / "b.png", "test/ppl"
    )
    (ax,) = data_axes(fig)
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # no zero-height error bars
    assert "one run each, no spread" in heading(fig)
    assert ax.get_ylabel() == "test perplexity (per token)"


def write_lm_run(run_dir, position, seed, ppl, data_class="WikiTextDataModule"):
    """A WikiText-like run: perplexities and token error (a fraction), with word-level perplexity (not for code)."""
    run_dir.mkdir(parents=True)
    config = {"seed_everything": seed, "model": {"position": position}, "data": {"init_args": {"seq_len": 128}}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"test/ppl": ppl, "test/error": 0.813, "test/loss": math.log(ppl)}
    if data_class == "WikiTextDataModule":
        metrics["test/word_ppl"] = 40 * ppl
    data = {"class": data_class, "seq_len": 128}
    result = {"model": {"position": position}, "data": data, "global_step": 600, "fit_finished": True}
    (run_dir / "results.json").write_text(json.dumps({**result, "metrics": metrics}))


def test_a_language_model_report_leads_with_perplexity_and_bars_speak_the_tables_units(tmp_path, drawn):
    for position, ppl in (("rope", 170.0), ("cope", 169.0)):
        write_lm_run(tmp_path / "runs" / f"wikitext-{position}" / "version_0", position, 0, ppl)
    files = build_report(tmp_path / "runs", tmp_path / "out")
    names = {p.name for p in files}
    assert "ppl_by_set.png" in names and "error_by_set.png" not in names
    assert any("![ppl per test set](ppl_by_set.png)" in p.read_text() for p in files if p.name == "README.md")
    for position, ppl in (("rope", 5.0), ("cope", 4.9)):  # code: no word count, still a language model
        write_lm_run(tmp_path / "code" / f"code-{position}" / "version_0", position, 0, ppl, "CodeDataModule")
    names = {p.name for p in build_report(tmp_path / "code", tmp_path / "code_out")}
    assert "ppl_by_set.png" in names and "error_by_set.png" not in names
    error = table_of(["rope"], ["test"], {"rope": [0.813]}, row_name="position")  # a table in fractions
    fig = drawn(plot_bars, error, tmp_path / "b.png", "test/error")
    (ax,) = data_axes(fig)
    assert ax.get_ylabel() == "test error (fraction)" and [t.get_text() for t in ax.texts] == ["0.813"]


def test_learning_curves_have_a_panel_per_data_set_and_a_line_per_encoding(tmp_path, drawn):
    from torch.utils.tensorboard import SummaryWriter

    runs = []
    for data in ("flipflop", "counting"):
        for position in ("cope", "rope"):
            for seed in (0, 1):
                run_dir = tmp_path / f"{data}-{position}-{seed}"
                with SummaryWriter(run_dir) as writer:
                    for step in (10, 20):
                        writer.add_scalar("val/error", 0.1 * seed + 0.01 * step, step)
                        writer.add_scalar("val/loss", 1.0 / step, step)
                runs.append({"run_dir": str(run_dir), "status": "ok", "data": data, "position": position})
    fig = drawn(plot_learning_curves, pd.DataFrame(runs), ["data", "position"], tmp_path / "c.png")
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["counting", "flipflop"] * 2
    assert [ax.get_ylabel() for ax in axes] == ["val error (%)"] * 2 + ["val loss (nats per token)"] * 2
    mean = {line.get_label(): list(line.get_ydata()) for line in axes[0].lines}
    assert mean["cope"] == pytest.approx([15.0, 25.0])  # seeds 0 and 1 averaged, in percent
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cope", "rope"]
    assert len(axes[0].collections) == 2  # the promised min-max band, one per encoding
    assert "band: min to max" in heading(fig)


def test_learning_curves_tick_the_validation_steps_and_draw_the_training_loss(tmp_path, drawn):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "wikitext-cope"
    with SummaryWriter(run_dir) as writer:
        for step in range(20, 620, 20):
            writer.add_scalar("train/loss", 6.0 - step / 300, step)
        for step in (200, 400, 600):
            writer.add_scalar("val/loss", 6.2 - step / 300, step)
            writer.add_scalar("val/error", 0.85 - step / 1e5, step)
    runs = pd.DataFrame([{"run_dir": str(run_dir), "status": "ok", "data": "wikitext", "position": "cope"}])
    fig = drawn(plot_learning_curves, runs, ["data", "position"], tmp_path / "c.png")
    error, loss = data_axes(fig)
    assert list(error.get_xticks()) == [200, 400, 600] == list(loss.get_xticks())
    assert [len(line.get_xdata()) for line in loss.lines] == [30, 3]  # training loss every 20 steps, then val
    assert "training loss (thin line)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert not error.collections and "one run each, no band" in heading(fig)  # no band promised
    low, high = error.get_ylim()
    assert high - low > 10  # 84.4 .. 84.8 % is not zoomed to its third decimal


def test_learning_curves_of_named_evaluation_sets_get_a_column_each(tmp_path, drawn):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "flipflop-cope"
    with SummaryWriter(run_dir) as writer:
        for set_name, error in (("in_dist", 0.1), ("ood_sparse", 0.4)):
            writer.add_scalar(f"val/error@{set_name}", error, 10)
        writer.add_scalar("val/error", 0.1, 10)  # the alias of the first set: no column of its own
    runs = pd.DataFrame([{"run_dir": str(run_dir), "status": "ok", "data": "flipflop", "position": "cope"}])
    fig = drawn(plot_learning_curves, runs, ["data", "position"], tmp_path / "c.png", tags=("val/error",))
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["in_dist", "ood_sparse"]
    assert [list(ax.lines[0].get_ydata()) for ax in axes] == [pytest.approx([10.0]), pytest.approx([40.0])]


def seeded_table(values, n=3):
    """A Table with given (mean, std) per row, each over n seeds, one column."""
    rows = list(values)
    keys = [(r, "128") for r in rows]
    mean = {(r, "128"): values[r][0] for r in rows}
    std = {(r, "128"): values[r][1] for r in rows}
    return Table("demo", "position", rows, ["128"], mean, std, dict.fromkeys(keys, n), dict.fromkeys(keys, n))


def test_a_winner_is_bold_only_beyond_the_seeds_spread():
    clear = seeded_table({"relative": (2.5, 0.1), "cope": (2.9, 0.1)})
    assert clear.best() == {"128": {"relative"}} and "| relative | **2.500 ± 0.100** | 3 |" in clear.markdown()
    within = seeded_table({"relative": (2.5, 0.3), "cope": (2.9, 0.2)})  # 0.4 apart, spreads add to 0.5
    assert within.best() == {} and "**" not in within.markdown()
    ties = seeded_table({"relative": (2.5, 0.0), "relative_capped": (2.5, 0.0), "cope": (2.7, 0.0)})
    assert ties.best() == {}  # a tie has no winner
    single = seeded_table({"relative": (2.5, math.nan), "cope": (9.0, math.nan)}, n=1)
    assert single.best() == {}  # never at n = 1
    assert "| relative | 2.500 | 1 |" in single.markdown()  # one run prints no "± 0.000"
    assert math.isnan(single.frame().loc[0, "128_std"])


def write_positions(run_dir, position, losses, train_len=32):
    """eval_context_positions.csv: per evaluated length, buckets of 16 tokens with the given losses."""
    rows = [
        {"run": run_dir.name, "position": position, "train_seq_len": train_len, "seq_len": length, "set": "",
         "bucket_start": 16 * b, "bucket_end": 16 * (b + 1), "tokens": 100, "loss": loss}
        for length, per_bucket in losses.items()
        for b, loss in enumerate(per_bucket)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(run_dir / "eval_context_positions.csv", index=False)


def test_position_losses_are_loaded_with_the_run_labels(tmp_path):
    save_dir = write_sweep(tmp_path, with_missing=False)
    write_positions(save_dir / "cope-seed0" / "version_0", "cope", {64: [2.0, 1.5, 1.4, 1.3]})
    positions = load_eval_context_positions(load_runs(tmp_path))
    assert len(positions) == 4 and set(positions["position"]) == {"cope"} and set(positions["seed"]) == {0}
    assert list(positions["seq_len"]) == [64] * 4 and positions["set"].iloc[0] == ""


def test_loss_by_position_report_figure(tmp_path, drawn):
    save_dir = write_sweep(tmp_path, with_missing=False)
    for position, seed, loss in (("cope", 0, 1.0), ("cope", 1, 2.0), ("rope", 0, 3.0)):
        write_positions(save_dir / f"{position}-seed{seed}" / "version_0", position, {32: [loss] * 2, 64: [loss] * 4})
    files = build_report(tmp_path, tmp_path / "out")
    assert tmp_path / "out" / "demo" / "loss_by_position.png" in files
    assert "loss_by_position.png" in (tmp_path / "out" / "demo" / "README.md").read_text()
    positions = load_eval_context_positions(load_runs(tmp_path))
    fig = drawn(plot_loss_by_position, positions, ["position"], tmp_path / "p.png", log_x=True)
    axes = data_axes(fig)
    assert [ax.get_title() for ax in axes] == ["evaluated at 32 tokens", "evaluated at 64 tokens"]  # every length
    cope = next(line for line in axes[1].lines if line.get_label() == "cope")
    assert list(cope.get_xdata()) == [8, 24, 40, 56] and list(cope.get_ydata()) == [1.5] * 4  # mean of seeds
    assert len(axes[1].collections) == 1  # cope's two seeds span a band; rope's one run does not
    assert "16-token buckets, 100 scored tokens each per run" in axes[1].get_xlabel()
    centre = (axes[0].get_position().x0 + axes[1].get_position().x1) / 2
    assert fig._suptitle.get_position()[0] == pytest.approx(centre)  # the heading sits over the panels
    assert axes[1].get_xscale() == "log" and axes[1].xaxis.get_major_formatter().get_offset() == ""
    assert any(line.get_label() == "train length 32" for line in axes[1].lines)


def test_report_readme_shows_every_figure_it_wrote(tmp_path):
    save_dir = write_sweep(tmp_path, with_missing=False)
    maps = save_dir / "cope-seed0" / "version_0" / "position_maps"
    maps.mkdir()
    (maps / "layer0.png").write_bytes(b"\x89PNG")
    files = build_report(tmp_path, tmp_path / "out")
    readme = (tmp_path / "out" / "demo" / "README.md").read_text()
    pngs = [p for p in files if p.suffix == ".png"]
    assert any(p.name == "layer0.png" for p in pngs)
    for png in pngs:
        assert f"]({png.relative_to(tmp_path / 'out' / 'demo').as_posix()})" in readme


def test_re_runs_of_a_seed_are_superseded_not_pooled_and_distinct_seeds_are_replicates(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "task-cope" / "version_0", "cope", 0, (0.5, 0.9))  # a shorter first try of seed 0
    write_run(root / "task-cope" / "version_1", "cope", 0, (0.1, 0.3))  # its re-run, the newest finished one
    write_run(root / "task-cope" / "version_2", "cope", 1, (0.2, 0.4))  # another seed: a replicate
    (root / "task-cope" / "version_3").mkdir()  # a re-run of seed 1 that never finished
    config = {"seed_everything": 1, "model": {"position": "cope"}, "data": {"class_path": "x.TaskDataModule"}}
    (root / "task-cope" / "version_3" / "config.yaml").write_text(yaml.safe_dump(config))
    for version, step in ((0, 300), (1, 600), (2, 600)):
        path = root / "task-cope" / f"version_{version}" / "results.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "global_step": step, "steps": {"test": step}}))
    files = build_report(root, tmp_path / "out")
    out = tmp_path / "out" / "runs"
    table = (out / "test_error.md").read_text()
    assert "| cope | 0.150 ± 0.071 | 0.350 ± 0.071 | 2 | 600 |" in table  # versions 1 and 2, not version 0
    superseded = pd.read_csv(out / "superseded.csv")
    assert out / "superseded.csv" in files
    assert sorted(superseded["run"]) == ["task-cope/version_0", "task-cope/version_3"]
    readme = (out / "README.md").read_text()
    assert "- task-cope/version_0 (step 300): re-run of the same name and seed; task-cope/version_1 is used" in readme
    assert not (out / "missing.csv").exists()  # a superseded run is not a missing one


def test_a_report_takes_several_folders_and_filters(tmp_path):
    write_run(tmp_path / "a" / "task-cope" / "version_0", "cope", 0, (0.1, 0.3))
    write_run(tmp_path / "b" / "task-rope" / "version_0", "rope", 0, (0.2, 0.6))
    write_run(tmp_path / "b" / "task-alibi" / "version_0", "alibi", 0, (0.4, 0.8))
    build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", filters=["position=*ope"])
    table = (tmp_path / "out" / "runs" / "test_error.md").read_text()
    assert "| cope | 0.100 | 0.300 | 1 | 10 |" in table and "| rope |" in table and "alibi" not in table
    with pytest.raises(ValueError, match="KEY a column of runs.csv"):
        build_report(tmp_path / "a", tmp_path / "out", filters=["colour=red"])
    with pytest.raises(ValueError, match="no runs under .* match step=5"):
        build_report(tmp_path / "a", tmp_path / "out", filters=["step=5"])


def test_a_legend_of_many_long_names_stays_inside_the_figure(tmp_path, monkeypatch):
    from cope_pl.reporting import plots

    names = ["alibi", "cope", "cope_sepkeys", "fire", "fox", "kerple", "none", "rope", "stick_breaking", "rope+yarn×4"]
    fig, axes = plots.panel_grid(1)
    handles = {name: axes[0][0].plot([0, 1], [i, i], label=name)[0] for i, name in enumerate(names)}
    legends = []
    monkeypatch.setattr(fig, "savefig", lambda *args, **kwargs: legends.extend(fig.legends))
    plots.finish(fig, axes, tmp_path / "f.png", "many encodings", handles)
    fig.draw_without_rendering()
    box = legends[0].get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
