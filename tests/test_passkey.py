"""Passkey retrieval: the key sits at its depth, only its digits are scored, sequences are reproducible, the
scorer is right for an oracle and says n/a where an encoding cannot go, and a tiny run ends in a heatmap."""

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cope_pl.cli import main
from cope_pl.data import IGNORE_INDEX, PasskeyDataModule
from cope_pl.data.passkey import (
    BOS,
    FIRST_FILLER,
    KEY,
    QUERY,
    SENTENCE_IDS,
    SENTENCE_WORDS,
    filler_length,
    needle_start,
)
from cope_pl.eval_passkey import COLUMNS, PASSKEY_FILE, evaluate_passkey
from cope_pl.lm import LanguageModel
from tests.conftest import fitted_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


def tokens_of(item) -> torch.Tensor:
    """The whole sequence back from an example (inputs plus the last label)."""
    return torch.cat([item["input_ids"], item["labels"][-1:]])


def key_of(item, key_len: int) -> list[int]:
    ids = item["input_ids"]
    start = int((ids == KEY).nonzero())
    return ids[start + 1 : start + 1 + key_len].tolist()


# The data ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("filler", ["sentences", "random"])
def test_the_key_sits_at_the_requested_depth(filler):
    dm = PasskeyDataModule(seq_len=48, key_len=5, depths=DEPTHS, filler=filler, eval_size=20)
    dm.setup("fit")
    fill = filler_length(48, 5)
    assert fill == 48 + 1 - 3 - 10
    for name, depth in dm.depth_of.items():
        for index in range(20):
            ids = dm.eval_sets[name][index]["input_ids"]
            assert len(ids) == 48 and ids[0] == BOS
            start = needle_start(48, 5, depth)
            assert start == 1 + round(depth * fill) and (ids == KEY).nonzero().flatten().tolist() == [start]
            assert (ids[1:start] >= FIRST_FILLER).all()  # only filler before the needle
            assert ids[start + 1 : start + 6].lt(10).all()  # the key's digits follow KEY
    depth0, depth1 = dm.eval_sets["depth000"][0]["input_ids"], dm.eval_sets["depth100"][0]["input_ids"]
    assert depth0[1] == KEY  # right after BOS
    assert depth1[1 + fill + 6] == QUERY  # right before the question


def test_only_the_key_digits_after_the_question_are_scored():
    dm = PasskeyDataModule(seq_len=40, key_len=4, eval_size=8)
    dm.setup("fit")
    for dataset in [dm.train_set, *dm.eval_sets.values()]:
        for index in range(8):
            item = dataset[index]
            scored = (item["labels"] != IGNORE_INDEX).nonzero().flatten().tolist()
            assert scored == [36, 37, 38, 39]  # the last key_len targets, nothing else
            assert item["input_ids"][36] == QUERY  # the first scored target is predicted from the question
            assert item["labels"][scored].tolist() == key_of(item, 4)


def test_training_draws_the_depth_uniformly():
    dm = PasskeyDataModule(seq_len=64, key_len=5, train_size=2000)
    dm.setup("fit")
    fill = filler_length(64, 5)
    depths = torch.tensor([(int((dm.train_set[i]["input_ids"] == KEY).nonzero()) - 1) / fill for i in range(2000)])
    assert depths.min() == 0 and depths.max() == 1
    for quarter in range(4):  # about a quarter of the needles in each quarter of the filler
        share = ((depths >= quarter / 4) & (depths < (quarter + 1) / 4)).float().mean()
        assert share == pytest.approx(0.25, abs=0.04)


def test_sequences_are_reproducible_per_seed_and_keys_agree_across_depths_and_lengths():
    a, b, c = (PasskeyDataModule(seq_len=32, key_len=5, seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup("fit")
    assert torch.equal(a.train_set[7]["input_ids"], b.train_set[7]["input_ids"])
    assert torch.equal(a.eval_sets["depth050"][3]["input_ids"], b.eval_sets["depth050"][3]["input_ids"])
    assert not torch.equal(a.train_set[7]["input_ids"], c.train_set[7]["input_ids"])
    longer = PasskeyDataModule(seq_len=128, key_len=5)
    longer.setup("fit")
    for index in range(10):  # the same key at every depth and length: depths and lengths compare the same keys
        keys = {tuple(key_of(s[index], 5)) for s in [*a.eval_sets.values(), *longer.eval_sets.values()]}
        assert len(keys) == 1
    val = [key_of(a.eval_sets["depth000"][i], 5) for i in range(50)]
    a.setup("test")
    test = [key_of(a.eval_sets["depth000"][i], 5) for i in range(50)]
    train = [key_of(a.train_set[i], 5) for i in range(50)]
    assert val != test and val != train  # `cope-pl test` scores keys validation never did


def test_filler_is_the_repeated_sentences_or_random_words():
    dm = PasskeyDataModule(seq_len=64, key_len=5)
    dm.setup("fit")
    ids = tokens_of(dm.eval_sets["depth100"][0])
    filler = ids[1 : 1 + filler_length(64, 5)]
    cycle = SENTENCE_IDS.tolist() * 4
    offset = next(i for i in range(len(SENTENCE_IDS)) if cycle[i : i + len(filler)] == filler.tolist())
    assert 0 <= offset < len(SENTENCE_IDS)  # a stretch of the repeated sentences
    assert dm.vocab_size == FIRST_FILLER + len(SENTENCE_WORDS)
    words = PasskeyDataModule(seq_len=64, filler="random", filler_vocab=7)
    words.setup("fit")
    assert words.vocab_size == FIRST_FILLER + 7
    ids = torch.stack([words.train_set[i]["input_ids"] for i in range(50)])
    filler = ids[ids >= FIRST_FILLER]
    assert int(filler.max()) == FIRST_FILLER + 6 and len(filler.unique()) == 7


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seq_len": 11, "key_len": 5}, "data.seq_len=11 is too short .* seq_len >= 12"),
        ({"key_len": 0}, "data.key_len must be >= 1"),
        ({"filler": "lorem"}, "data.filler must be one of sentences, random"),
        ({"depths": [0.5, 1.5]}, r"data.depths must be a non-empty list of fractions in \[0, 1\]"),
        ({"depths": [0.5, 0.5]}, "data.depths has repeated depths"),
    ],
)
def test_bad_passkey_options_are_reported(options, message):
    with pytest.raises(ValueError, match=message):
        PasskeyDataModule(**options)


def test_the_paper_scale_config_fits_its_model():
    data = yaml.safe_load((CONFIGS / "data/passkey.yaml").read_text())["data"]["init_args"]
    max_seq_len = yaml.safe_load((CONFIGS / "model/toy_task.yaml").read_text())["model"]["max_seq_len"]
    dm = PasskeyDataModule(**data | {"train_size": 4, "eval_size": 2})
    dm.setup("fit")
    assert len(dm.eval_sets["depth050"][0]["input_ids"]) == 512 <= max_seq_len


# The scorer --------------------------------------------------------------------------------------------
DATA = {"seq_len": 16, "batch_size": 8, "key_len": 3, "depths": [0.0, 0.5, 1.0], "eval_size": 8, "train_size": 64}


def tiny_run(root: Path, position: str, max_seq_len: int = 64) -> Path:
    data_class = "cope_pl.data.PasskeyDataModule"
    return fitted_run(root, f"passkey-{position}", data_class, DATA, position, max_seq_len=max_seq_len)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("passkey_runs")
    return {"rope": tiny_run(root, "rope"), "absolute": tiny_run(root, "absolute", max_seq_len=16)}


@pytest.fixture
def run_copy(trained, tmp_path):
    """A fresh copy of a trained run, so each test writes its own passkey.csv."""

    def copy(position: str) -> Path:
        target = tmp_path / trained[position].parent.name / "version_0"
        shutil.copytree(trained[position], target)
        return target

    return copy


def oracle_forward(wrong_last_digit: bool = False):
    """A forward that reads the key after KEY and predicts it after QUERY (optionally one digit off at the end)."""

    def forward(self, input_ids):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.hparams.vocab_size)
        for row in range(b):
            ids = input_ids[row]
            start, query = int((ids == KEY).nonzero()), int((ids == QUERY).nonzero())
            key = ids[start + 1 : start + 1 + DATA["key_len"]].tolist()
            for i, digit in enumerate(key):
                if wrong_last_digit and i == len(key) - 1:
                    digit = (digit + 1) % 10
                logits[row, query + i, digit] = 10.0
        return logits

    return forward


def test_an_oracle_scores_accuracy_one_at_every_length_and_depth(run_copy, monkeypatch):
    run = run_copy("rope")
    monkeypatch.setattr(LanguageModel, "forward", oracle_forward())
    rows = evaluate_passkey(run, ["1x", "2x"], device="cpu")
    assert [(r["seq_len"], r["depth"]) for r in rows] == [
        (16, 0.0),
        (16, 0.5),
        (16, 1.0),
        (32, 0.0),
        (32, 0.5),
        (32, 1.0),
    ]
    assert all(r["status"] == "ok" and r["samples"] == 8 for r in rows)
    assert all(r["accuracy"] == 1.0 and r["digit_accuracy"] == 1.0 for r in rows)


def test_one_wrong_digit_fails_the_exact_match_but_not_the_other_digits(run_copy, monkeypatch):
    run = run_copy("rope")
    monkeypatch.setattr(LanguageModel, "forward", oracle_forward(wrong_last_digit=True))
    rows = evaluate_passkey(run, ["1x"], device="cpu")
    assert all(r["accuracy"] == 0.0 and r["digit_accuracy"] == pytest.approx(2 / 3) for r in rows)


def test_an_absolute_model_past_its_table_gives_n_a_rows_not_a_crash(run_copy):
    run = run_copy("absolute")
    rows = evaluate_passkey(run / "checkpoints" / "last.ckpt", ["1x", "2x"], device="cpu")
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["n/a"] * 3
    assert all("learned absolute position table" in r["reason"] and "accuracy" not in r for r in rows[3:])
    with open(run / PASSKEY_FILE, newline="") as f:
        saved = list(csv.DictReader(f))
    assert [(s["seq_len"], s["depth"], s["status"], s["accuracy"]) for s in saved[3:]] == [
        ("32", "0.0", "n/a", ""), ("32", "0.5", "n/a", ""), ("32", "1.0", "n/a", "")
    ]  # fmt: skip


def test_the_csv_has_its_columns_and_a_rescored_length_replaces_its_rows(run_copy):
    run = run_copy("rope")
    evaluate_passkey(run, ["1x", "2x"], device="cpu")
    evaluate_passkey(run, ["2x"], depths=[0.5], samples=3, device="cpu")
    frame = pd.read_csv(run / PASSKEY_FILE)
    assert list(frame.columns) == list(COLUMNS)
    assert {"run", "train_seq_len", "seq_len", "depth", "samples", "accuracy", "digit_accuracy"} <= set(COLUMNS)
    assert list(zip(frame.seq_len, frame.depth)) == [(16, 0.0), (16, 0.5), (16, 1.0), (32, 0.0), (32, 0.5), (32, 1.0)]
    assert frame.set_index(["seq_len", "depth"]).loc[(32, 0.5), "samples"] == 3  # replaced, not appended
    assert (frame.run == "passkey-rope/version_0").all() and (frame.train_seq_len == 16).all()
    assert (frame.checkpoint_step == 2).all()  # the step of the scored checkpoint
    assert frame.accuracy.between(0, 1).all() and frame.digit_accuracy.between(0, 1).all()


def test_scoring_a_run_of_another_task_says_what_to_use(tmp_path):
    run = tmp_path / "copy-rope" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"class_path": "cope_pl.data.CopyDataModule"}}))
    with pytest.raises(ValueError, match="not cope_pl.data.PasskeyDataModule; score other tasks with cope-pl eval"):
        evaluate_passkey(run)


def test_a_sweep_with_a_passkey_section_scores_each_cell_after_fit_and_test(tmp_path, monkeypatch):
    from cope_pl.sweep import load_sweep, slurm_script, step_command, step_done

    monkeypatch.chdir(ROOT)
    sweep = load_sweep(CONFIGS / "sweeps/passkey_cpu.yaml", save_dir=tmp_path)
    assert len(sweep.cells) == 12 and sweep.steps(sweep.cells[0]) == ["fit", "test", "passkey"]
    cell = sweep.cells[0]
    assert step_command(sweep, cell, "passkey")[3:] == [
        "passkey",
        str(sweep.run_dir(cell)),
        "--lengths",
        "1x",
        "2x",
        "4x",
        "8x",
    ]
    assert not step_done(sweep, cell, "passkey")
    sweep.run_dir(cell).mkdir(parents=True)
    (sweep.run_dir(cell) / PASSKEY_FILE).write_text(",".join(COLUMNS) + "\n")
    assert not step_done(sweep, cell, "passkey")  # no rows yet
    row = {"seq_len": "64", "depth": "0.0", "rope_scaling": ""}  # an unscaled row
    header = ",".join(COLUMNS) + "\n"
    (sweep.run_dir(cell) / PASSKEY_FILE).write_text(header + ",".join(row.get(c, "") for c in COLUMNS) + "\n")
    assert step_done(sweep, cell, "passkey")
    assert [c.keys["seed"] for c in sweep.cells[::2]] == ["seed0"] * 6  # the header's even cells: seed 0
    script = slurm_script(sweep, CONFIGS / "sweeps/passkey_cpu.yaml")
    assert "    step passkey srun --ntasks=1 --nodes=1 " in script  # one scoring process per cell


# End to end --------------------------------------------------------------------------------------------
def passkey_rows(position, seed, lengths, train_len=16, not_applicable=()):
    rows = []
    for length in lengths:
        for depth in (0.0, 0.5, 1.0):
            row = {"run": f"{position}-seed{seed}/version_0", "position": position, "train_seq_len": train_len,
                   "seq_len": length, "factor": length / train_len, "depth": depth}  # fmt: skip
            if length in not_applicable:
                rows.append({**row, "samples": 0, "status": "n/a", "reason": "longer than the learned table"})
            else:
                accuracy = 1.0 - depth * length / 100
                rows.append({**row, "samples": 8, "status": "ok", "reason": "", "accuracy": accuracy,
                             "digit_accuracy": 1.0, "loss": 0.1})  # fmt: skip
    return rows


def test_the_heatmap_has_a_panel_per_encoding_with_labelled_axes_and_n_a_cells(tmp_path, monkeypatch):
    from cope_pl.atomic import write_csv_atomic
    from cope_pl.reporting import plots
    from cope_pl.reporting.collect import load_passkey, load_runs

    for position, seed in (("absolute", 0), ("cope", 0), ("cope", 1)):
        run = tmp_path / "runs" / f"{position}-seed{seed}" / "version_0"
        run.mkdir(parents=True)
        config = {"seed_everything": seed, "model": {"position": position}, "data": {"init_args": {"seq_len": 16}}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        results = {"model": {"position": position}, "data": {"class": "PasskeyDataModule", "seq_len": 16}}
        (run / "results.json").write_text(json.dumps({**results, "fit_finished": True, "metrics": {}}))
        absolute = (32, 64) if position == "absolute" else ()
        write_csv_atomic(run / PASSKEY_FILE, COLUMNS, passkey_rows(position, seed, (16, 32, 64), 16, absolute))
    runs = load_runs(tmp_path / "runs")
    frame = load_passkey(runs)
    assert len(frame) == 27 and set(frame.position) == {"absolute", "cope"}
    figures = []
    monkeypatch.setattr(plots.pyplot(), "close", lambda fig: figures.append(fig))
    plots.plot_passkey(frame, ["position"], tmp_path / "p.png", "accuracy", "demo", runs)
    fig = figures[-1]
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["absolute (1 run)", "cope (2 runs)"]  # seeds differ: say so
    assert panels[0].get_ylabel() == "needle depth (% of filler before the key)"
    assert all(ax.get_xlabel() == "evaluated length (tokens, × training length)" for ax in panels)
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["16\n1×", "32\n2×", "64\n4×"]
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["0", "50", "100"]
    assert [t.get_text() for t in panels[0].texts].count("n/a") == 6  # 2 lengths x 3 depths
    cope = [t.get_text() for t in panels[1].texts]
    assert "1.00" in cope and "0.36" in cope and "n/a" not in cope  # 1 - 1.0 * 64 / 100, both seeds alike
    colourbar = next(ax for ax in fig.axes if not ax.get_title() and ax.get_ylabel())
    assert colourbar.get_ylabel() == "exact-match accuracy (every key digit right)"
    assert colourbar.get_ylim() == (0.0, 1.0)
    assert "mean over each panel's runs" in fig._suptitle.get_text()
    assert (tmp_path / "p.png").stat().st_size > 0


def test_fit_score_and_report_a_tiny_passkey_run(tmp_path):
    main(
        ["fit", "--config", str(CONFIGS / "trainer/smoke.yaml"), "--config", str(CONFIGS / "data/passkey_cpu.yaml")]
        + ["--config", str(CONFIGS / "model/tiny.yaml"), "--config", str(CONFIGS / "position/cope.yaml")]
        + ["--data.init_args.seq_len=24", "--data.init_args.eval_size=4", "--data.init_args.batch_size=4"]
        + ["--data.init_args.train_size=64", "--model.max_seq_len=24"]
        + ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    )
    run = tmp_path / "runs" / "passkey-cope" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert {f"val/error@depth{d}" for d in ("000", "025", "050", "075", "100")} <= set(results["metrics"])
    main(["passkey", str(run), "--lengths", "1x", "2x", "--samples", "4"])
    frame = pd.read_csv(run / PASSKEY_FILE)
    assert list(zip(frame.seq_len, frame.depth)) == [(n, d) for n in (24, 48) for d in DEPTHS]
    assert (frame.status == "ok").all() and (frame.samples == 4).all()
    main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "reports")])
    out = tmp_path / "reports" / "runs"
    assert (out / "passkey.png").stat().st_size > 0 and (out / "passkey_digits.png").stat().st_size > 0
    readme = (out / "README.md").read_text()
    assert "## Passkey retrieval" in readme and "](passkey.png)" in readme and "| cope |" in readme
