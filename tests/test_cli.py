"""The `cope-pl` command line: testing a finished run in place, the command list, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cope_pl.cli import main
from cope_pl.reporting.collect import load_runs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FIT = [
    "fit",
    *("--config", str(CONFIGS / "trainer/smoke.yaml")),
    *("--config", str(CONFIGS / "data/copy.yaml")),
    *("--config", str(CONFIGS / "model/tiny.yaml")),
]


def cope_pl(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cope_pl.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    main([*FIT, f"--trainer.logger.init_args.save_dir={runs}"])  # 4 steps
    return runs / "copy-rope" / "version_0"


def scalar_steps(run: Path, tag: str) -> list[int]:
    steps = []
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return steps


def scalar_tags(run: Path) -> set[str]:
    tags = set()
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_test_of_a_run_dir_adds_test_metrics_to_that_run_at_its_step(finished_run, tmp_path):
    config = (finished_run / "config.yaml").read_bytes()
    done = cope_pl("test", str(finished_run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((finished_run / "results.json").read_text())
    assert {"test/loss", "test/error", "val/loss"} <= set(results["metrics"])
    assert results["global_step"] == 4 and results["steps"]["test"] == 4
    assert "Final test metrics (step 4)" in done.stdout
    assert "Test metric" not in done.stdout  # printed once, not again in Lightning's table
    assert "Tip:" not in done.stdout + done.stderr and "litlogger" not in done.stdout + done.stderr  # no advert
    assert "deprecated" not in done.stderr and "srun" not in done.stderr
    assert scalar_steps(finished_run, "test/loss") == [4]
    assert (finished_run / "config.yaml").read_bytes() == config  # the fit's config, byte for byte
    assert list(tmp_path.iterdir()) == []  # nothing written outside the run directory
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["version_0"]  # no new version


def test_fit_output_says_nothing_about_weights_only(tmp_path):
    """Lightning logs "`weights_only` was not set, defaulting to `False`" when a checkpoint is saved without saying
    which: read as being about loading, it suggests checkpoints are unpickled unsafely (they never are)."""
    # No validation at the end: last.ckpt is written by the end-of-fit save (cope_pl/last_step.py).
    done = cope_pl(*FIT, f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.limit_val_batches=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "copy-rope" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert "weights_only" not in done.stdout + done.stderr


def test_training_and_validation_are_logged_at_the_step_their_update_completes(finished_run):
    assert scalar_steps(finished_run, "train/loss") == [1, 2, 3, 4]  # log_every_n_steps 1, max_steps 4
    assert scalar_steps(finished_run, "val/loss") == [4]  # after 4 updates, as results.json and checkpoints say
    assert json.loads((finished_run / "results.json").read_text())["global_step"] == 4
    assert scalar_steps(finished_run, "train/lr") == [1, 2, 3, 4]  # the rate of each of those updates
    assert scalar_steps(finished_run, "train/batches") == [1, 2, 3, 4]  # the throughput monitor's counters
    assert not [t for t in scalar_tags(finished_run) if t.startswith(("validate/", "lr-"))]  # nothing at batch idx


def test_a_retest_is_not_counted_as_another_seed(finished_run):
    assert cope_pl("test", str(finished_run)).returncode == 0
    runs = load_runs(finished_run.parent.parent)
    assert len(runs) == 1 and runs.iloc[0]["status"] == "ok"


def test_report_skips_a_directory_that_only_tested_another_run(finished_run, tmp_path):
    retest = tmp_path / "copy-rope" / "version_1"  # what the old `cope-pl test --config ...` form left
    retest.mkdir(parents=True)
    results = json.loads((finished_run / "results.json").read_text())
    results.pop("fit_finished", None)
    results["metrics"] = {k: v for k, v in results["metrics"].items() if k.startswith("test/")}
    (retest / "results.json").write_text(json.dumps(results))
    assert load_runs(tmp_path).empty


def test_testing_a_run_that_never_finished_fit_is_refused(finished_run, tmp_path):
    unfinished = tmp_path / "copy-rope" / "version_0"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "config.yaml").write_bytes((finished_run / "config.yaml").read_bytes())
    (unfinished / "checkpoints" / "last.ckpt").write_bytes((finished_run / "checkpoints/last.ckpt").read_bytes())
    done = cope_pl("test", str(unfinished))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"cope-pl: error: {unfinished} has not finished training")


def test_help_lists_every_command():
    done = cope_pl("--help")
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    tools = ["eval-context", "passkey", "sweep", "report", "position-maps", "count-probe", "generate", "launch", "plan"]
    assert listed == ["fit", "validate", "test", *tools]


@pytest.mark.parametrize(
    "args, message",
    [
        (["fitt"], "cope-pl: error: unknown command 'fitt'; the commands are fit, validate, test"),
        (["predict"], "cope-pl: error: unknown command 'predict'"),
        ([*FIT, "--trainer.max_steps=-5"], "cope-pl: error: `max_steps` must be a non-negative integer"),
        ([*FIT, "--trainer.max_steps=abc"], 'cope-pl: error: Parser key "trainer.max_steps"; Expected a <class'),
    ],
    ids=["unknown-command", "predict", "lightning-misconfiguration", "parse-error"],
)
def test_misuse_is_one_line(args, message, tmp_path):
    done = cope_pl(*args, *(["--trainer.logger=false"] if args[0] == "fit" else []), cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-1000:]


def test_a_mistyped_position_leaves_no_run_directory(tmp_path):
    done = cope_pl(*FIT, "--model.position=ropee", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}")
    assert "unknown position encoding 'ropee'" in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("checkpointing", [[], ["--checkpoint.every_n_train_steps=4"]], ids=["default", "every_4"])
def test_a_fit_validates_and_checkpoints_its_last_step_and_test_names_it(checkpointing, tmp_path):
    import torch

    runs = tmp_path / "runs"  # 6 steps, validation every 4: the last step is not a validation step
    main([*FIT, "--trainer.max_steps=6", f"--trainer.logger.init_args.save_dir={runs}", *checkpointing])
    run = runs / "copy-rope" / "version_0"
    assert scalar_steps(run, "val/loss") == [4, 6]  # at the optimizer steps done, as checkpoints count them
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    done = cope_pl("test", str(run))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Final test metrics (step 6)" in done.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 6 and results["steps"] == {"fit": 6, "test": 6}
    row = load_runs(runs).iloc[0]
    assert (row["step"], row["val_step"], row["test_step"]) == (6, 6, 6)


def test_default_root_dir_chooses_where_runs_go_and_an_explicit_save_dir_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([*FIT, "--trainer.max_steps=1", "--trainer.default_root_dir=elsewhere"])
    assert (tmp_path / "elsewhere" / "copy-rope" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()
    main(
        [*FIT, "--trainer.max_steps=1", "--trainer.default_root_dir=elsewhere", "--trainer.logger.init_args.save_dir=x"]
    )
    assert (tmp_path / "x" / "copy-rope" / "version_0" / "results.json").is_file()
