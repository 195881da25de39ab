"""Sweeps: the grid, skip/resume of completed steps, failures recorded, the SLURM array script.

The steps run a fake `python` (written by the test) that leaves the files a real step would, so the
sweep logic is tested without training anything.
"""

import json
import re
import stat
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cope_pl.cli import main
from cope_pl.sweep import load_sweep, run_sweep, slurm_script, step_command, step_done

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

FAKE_PYTHON = """#!{python}
# Fake `python -m cope_pl.cli STEP ...`: appends the call to calls.log and writes what the step would.
import json, sys
from pathlib import Path
args = sys.argv[3:]
step = args[0]
with open({calls!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--trainer.logger") and "=" in a)
if step in ("eval-context", "passkey"):  # rows merged into the run's file, labelled with their RoPE scaling
    value = lambda flag: args[args.index(flag) + 1]
    scaling = f"{{value('--rope-scaling')}}\u00d7{{value('--rope-factor')}}" if "--rope-scaling" in args else ""
    path = Path(args[1], "eval_context.json" if step == "eval-context" else "passkey.csv")
    if step == "eval-context":
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rows + [{{"seq_len": 8, "rope_scaling": scaling}}]))
    else:
        path.write_text((path.read_text() if path.exists() else "seq_len,rope_scaling\\n") + f"8,{{scaling}}\\n")
    sys.exit(0)
if step == "test":  # `test RUN_DIR`: in place
    run = Path(args[1])
else:
    name = opts["--trainer.logger.init_args.name"[2:]]
    if "bad" in name:
        sys.exit(3)
    run = Path(opts["trainer.logger.init_args.save_dir"], name, "version_0")
run.mkdir(parents=True, exist_ok=True)
results = run / "results.json"
data = json.loads(results.read_text()) if results.exists() else {{"metrics": {{}}}}
data["metrics"]["val/loss" if step == "fit" else "test/loss"] = 1.0
results.write_text(json.dumps(data))
"""


def write_sweep(tmp_path, grid, **extra):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, calls=str(tmp_path / "calls.log")))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    spec = {
        "name": "demo",
        "save_dir": str(tmp_path / "runs"),
        "python": str(fake),
        "configs": [str(CONFIGS / "trainer/smoke.yaml")],
        "grid": grid,
        **extra,
    }
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def calls(tmp_path):
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


POSITIONS = [str(CONFIGS / "position/rope.yaml"), str(CONFIGS / "position/cope.yaml")]


def test_grid_is_the_product_of_its_axes_with_deterministic_names(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS, "model.d_model": [32, 64], "seed": [0, 1]}))
    assert len(sweep.cells) == 8
    assert sweep.cells[0].name == "rope-d_model32-seed0"
    assert sweep.cells[-1].name == "cope-d_model64-seed1"
    assert sweep.cells[-1].overrides == {"model.d_model": 64, "data.init_args.seed": 1} and sweep.cells[-1].seed == 1
    assert sweep.cells[-1].configs[-1].endswith("position/cope.yaml")


def test_completed_cells_are_skipped_on_rerun(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS, "seed": [0]}))
    assert run_sweep(sweep, log=lambda *_: None) == {"rope-seed0": "done", "cope-seed0": "done"}
    first = calls(tmp_path)
    assert [c.split()[0] for c in first] == ["fit", "test", "fit", "test"]
    assert run_sweep(sweep, log=lambda *_: None) == {"rope-seed0": "skipped", "cope-seed0": "skipped"}
    assert calls(tmp_path) == first  # nothing ran again


def test_resume_runs_only_the_missing_steps(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS[:1]}, eval_context={"lengths": ["1x", "2x"]}))
    cell = sweep.cells[0]
    run_sweep(sweep, log=lambda *_: None)
    (sweep.run_dir(cell) / "eval_context.json").unlink()  # as if eval-context had been interrupted
    assert step_done(sweep, cell, "test") and not step_done(sweep, cell, "eval-context")
    run_sweep(sweep, log=lambda *_: None)
    assert [c.split()[0] for c in calls(tmp_path)] == ["fit", "test", "eval-context", "eval-context"]
    assert "--lengths 1x 2x" in calls(tmp_path)[-1]


def test_a_cell_killed_mid_fit_keeps_its_checkpoints_for_the_resumed_fit(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS[:1]}))
    cell = sweep.cells[0]
    checkpoint = sweep.run_dir(cell) / "checkpoints" / "last.ckpt"  # what the killed fit left
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"steps so far")
    assert run_sweep(sweep, log=lambda *_: None) == {cell.name: "done"}
    fit = calls(tmp_path)[0]
    assert fit.startswith("fit ") and "--ckpt_path=last" in fit and checkpoint.read_bytes() == b"steps so far"


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path):
    grid = {"position": [{"label": "bad", "configs": POSITIONS[:1]}, POSITIONS[1]]}
    sweep = load_sweep(write_sweep(tmp_path, grid))
    assert run_sweep(sweep, log=lambda *_: None) == {"bad": "failed", "cope": "done"}
    status = json.loads((tmp_path / "runs" / "status" / "bad.json").read_text())
    assert status["status"] == "failed" and status["step"] == "fit" and status["returncode"] == 3
    manifest = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == ["bad", "cope"]  # the report will list the failed cell


def test_a_missing_config_file_fails_clearly(tmp_path):
    path = write_sweep(tmp_path, {"data": ["configs/data/does_not_exist.yaml"]})
    with pytest.raises(FileNotFoundError, match="grid.data names configs/data/does_not_exist.yaml"):
        load_sweep(path)


def test_slurm_script_has_one_array_task_per_cell_and_srun_steps(tmp_path):
    path = write_sweep(
        tmp_path,
        {"position": POSITIONS, "seed": [0, 1, 2]},
        eval_context={"lengths": ["1x", "4x"]},
        slurm={"nodes": 2, "gpus_per_node": 4, "max_parallel": 3, "partition": "gpu"},
        configs=[str(CONFIGS / "trainer/gpu_ddp.yaml")],
    )
    sweep = load_sweep(path)
    script = slurm_script(sweep, path)
    assert "#SBATCH --array=0-5%3" in script
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script
    fits = [line for line in script.splitlines() if line.strip().startswith("step") and " fit " in line]
    assert len(fits) == 6 and all(" srun " in f and "--trainer.num_nodes=2" in f for f in fits)
    assert "  5)  # cope-seed2" in script
    assert "--trainer.logger.init_args.name=cope-seed2" in script
    assert "srun --ntasks=1 --nodes=1" in script and "eval-context" in script
    assert '--step-done "$CELL" "$name"' in script  # completed steps are skipped on resubmission


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_ready_made_sweep_files_load_and_their_cells_parse(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # config paths in sweep files are relative to the repository root
    sweep = load_sweep(path, save_dir=tmp_path)
    for cell in (sweep.cells[0], sweep.cells[-1]):
        fit_args = step_command(sweep, cell, "fit")[4:]  # after `python -m cope_pl.cli fit`
        with pytest.raises(SystemExit) as info:
            main(["fit", *fit_args, "--print_config"])
        assert info.value.code == 0, f"{cell.name}: {capsys.readouterr().err[-500:]}"


@pytest.mark.parametrize(
    "sweep_file", ["table2_flipflop_cpu.yaml", "table2_selective_copy_cpu.yaml", "table3_cpu.yaml", "passkey_cpu.yaml"]
)
def test_the_seed_axis_seeds_the_training_data_and_keeps_the_evaluation_sets(sweep_file, tmp_path, monkeypatch):
    from cope_pl.cli import CopeCLI, trainer_defaults
    from cope_pl.data import LMDataModule
    from cope_pl.lm import LanguageModel
    from cope_pl.sweep import lightning_command

    monkeypatch.chdir(ROOT)  # the sweep's config paths are relative to the repository root
    sweep = load_sweep(CONFIGS / "sweeps" / sweep_file, save_dir=tmp_path)
    first = next(c for c in sweep.cells if c.seed is not None)
    twin = next(c for c in sweep.cells if c.seed != first.seed and c.configs == first.configs)
    modules = []
    for cell in (first, twin):
        small = {"data.init_args.train_size": 300}  # fewer counting programs to generate; the rest as run
        args = lightning_command(sweep, cell, "fit", small)[4:]  # what `python -m cope_pl.cli fit` parses
        cli = CopeCLI(
            LanguageModel,
            LMDataModule,
            subclass_mode_data=True,
            run=False,
            args=args,
            trainer_defaults=trainer_defaults(),
        )
        modules.append(cli.datamodule)
    for dm in modules:
        dm.setup("fit")
    batches = [next(iter(dm.train_dataloader()))["input_ids"] for dm in modules]
    assert not torch.equal(batches[0], batches[1])  # other sequences (and order) per seed
    for stage in ("fit", "test"):
        for dm in modules:
            dm.setup(stage)
        assert modules[0].eval_names == modules[1].eval_names
        for name in modules[0].eval_names:
            a, b = (dm.eval_sets[name] for dm in modules)
            assert len(a) == len(b) and all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(len(a)))


def test_eval_context_token_limit_reaches_the_command(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS[:1]}, eval_context={"limit_tokens": 500}))
    cmd = step_command(sweep, sweep.cells[0], "eval-context")
    assert cmd[cmd.index("--limit-tokens") + 1] == "500"


def test_checkpoint_best_tests_and_scores_the_lowest_validation_loss(tmp_path):
    """A real sweep cell (no fake python): the fit keeps checkpoints/best.ckpt by val/loss beside last.ckpt, and
    test and eval-context (unscaled and with YaRN) read that checkpoint."""
    spec = {
        "name": "best",
        "save_dir": str(tmp_path / "runs"),
        "configs": [str(CONFIGS / "trainer/smoke.yaml"), str(CONFIGS / "model/tiny.yaml")],
        "overrides": {"trainer.max_steps": 6, "trainer.val_check_interval": 2, "model.lr": 0.05},
        "grid": {"position": [str(CONFIGS / "position/rope.yaml")]},
        "checkpoint": "best",
        "eval_context": {"lengths": ["1x"], "rope_scaling": [{"type": "yarn", "factor": 2}]},
    }
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    cell = sweep.cells[0]
    assert run_sweep(sweep, log=lambda *_: None) == {cell.name: "done"}
    run = sweep.run_dir(cell)
    best = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    state = next(v for k, v in best["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["monitor"] == "val/loss" and Path(state["best_model_path"]).name == "best.ckpt"
    assert (run / "checkpoints" / "last.ckpt").is_file()  # kept for resuming
    results = json.loads((run / "results.json").read_text())
    assert "test/loss" in results["metrics"]
    rows = json.loads((run / "eval_context.json").read_text())
    assert {r["checkpoint_step"] for r in rows} == {best["global_step"]}
    assert sorted(r["rope_scaling"] for r in rows) == ["", "yarn×2"]
    for step in ("test", "eval-context", "eval-context:yarn2"):
        assert str(run / "checkpoints" / "best.ckpt") in step_command(sweep, cell, step)


def test_an_unknown_checkpoint_choice_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        load_sweep(write_sweep(tmp_path, {"position": POSITIONS[:1]}, checkpoint="newest"))


def test_rope_scaling_adds_an_eval_context_step_to_the_cells_with_rope_only(tmp_path):
    scaling = {
        "lengths": ["1x", "4x"],
        "rope_scaling": [{"type": "yarn", "factor": 4}, {"type": "linear", "factor": 2}],
    }
    sweep = load_sweep(write_sweep(tmp_path, {"position": POSITIONS}, eval_context=scaling))
    rope, cope = sweep.cells
    assert sweep.steps(rope) == ["fit", "test", "eval-context", "eval-context:yarn4", "eval-context:linear2"]
    assert sweep.steps(cope) == ["fit", "test", "eval-context"]
    cmd = step_command(sweep, rope, "eval-context:yarn4")
    assert cmd[3:] == ["eval-context", str(sweep.run_dir(rope)), "--lengths", "1x", "4x", "--rope-scaling", "yarn",
                       "--rope-factor", "4"]  # fmt: skip
    assert run_sweep(sweep, log=lambda *_: None) == {"rope": "done", "cope": "done"}
    scored = [c.split() for c in calls(tmp_path) if c.startswith("eval-context")]
    assert [c[-1] if "--rope-scaling" in c else c[1].split("/")[-2] for c in scored] == ["rope", "4", "2", "cope"]
    run = sweep.run_dir(rope)  # the linear rows lost, as if that step had been interrupted: only it runs again
    rows = json.loads((run / "eval_context.json").read_text())
    (run / "eval_context.json").write_text(json.dumps([r for r in rows if r["rope_scaling"] != "linear×2"]))
    assert step_done(sweep, rope, "eval-context:yarn4") and not step_done(sweep, rope, "eval-context:linear2")
    before = len(calls(tmp_path))
    assert run_sweep(sweep, log=lambda *_: None) == {"rope": "done", "cope": "skipped"}
    assert [c.split()[-1] for c in calls(tmp_path)[before:]] == ["2"]


def test_rope_scaling_of_passkey_steps_and_in_the_slurm_script(tmp_path):
    path = write_sweep(
        tmp_path, {"position": POSITIONS}, passkey={"lengths": ["1x"], "rope_scaling": [{"type": "yarn", "factor": 8}]}
    )
    sweep = load_sweep(path)
    assert sweep.steps(sweep.cells[0]) == ["fit", "test", "passkey", "passkey:yarn8"]
    assert sweep.steps(sweep.cells[1]) == ["fit", "test", "passkey"]
    script = slurm_script(sweep, path)
    scaled = [line for line in script.splitlines() if line.strip().startswith("step passkey:yarn8")]
    assert len(scaled) == 1 and "srun --ntasks=1 --nodes=1" in scaled[0] and "--rope-factor 8" in scaled[0]
    assert run_sweep(sweep, log=lambda *_: None) == {"rope": "done", "cope": "done"}
    assert step_done(sweep, sweep.cells[0], "passkey:yarn8") and step_done(sweep, sweep.cells[0], "passkey")


@pytest.mark.parametrize(
    "entries, problem",
    [
        ({"type": "yarn", "factor": 4}, "must be a non-empty list"),
        ([{"type": "ntk", "factor": 4}], "is not {type: one of"),
        ([{"type": "yarn"}], "is not {type: one of"),
        ([{"type": "yarn", "factor": 0.5}], "must be >= 1"),
    ],
)
def test_a_bad_rope_scaling_entry_fails_clearly(tmp_path, entries, problem):
    path = write_sweep(tmp_path, {"position": POSITIONS}, eval_context={"lengths": ["1x"], "rope_scaling": entries})
    with pytest.raises(ValueError, match=f"eval_context.rope_scaling.*{re.escape(problem)}"):
        load_sweep(path)


def test_the_encodings_copy_sweep_scores_its_rope_cells_with_yarn(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(CONFIGS / "sweeps" / "encodings_copy_cpu.yaml", save_dir=tmp_path)
    scaled = {cell.name for cell in sweep.cells if "eval-context:yarn4" in sweep.steps(cell)}
    assert scaled == {"rope-seed0", "rope-seed1", "rope-seed2"}


@pytest.mark.parametrize("task, length", [("copy", 32), ("counting", 171), ("flipflop", 256), ("passkey", 64)])
def test_the_encodings_sweeps_start_fires_threshold_at_their_training_length(task, length, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    sweep = load_sweep(CONFIGS / "sweeps" / f"encodings_{task}_cpu.yaml")
    (cell,) = [c for c in sweep.cells if c.keys["position"] == "fire" and c.seed == 0]
    with pytest.raises(SystemExit) as info:
        main(["fit", *step_command(sweep, cell, "fit")[4:], "--print_config"])
    assert info.value.code == 0
    options = yaml.safe_load(capsys.readouterr().out)["model"]["position_options"]
    assert options == {"mlp_width": 32, "init_c": 0.1, "init_L": length}
