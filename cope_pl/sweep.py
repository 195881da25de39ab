"""Ablation sweeps: a YAML grid of configs and overrides, run cell by cell or as a SLURM array job.

A sweep file names configs shared by every cell, fixed overrides, and a grid of axes:

    name: copy_extrapolation_cpu
    configs: [configs/trainer/cpu.yaml, configs/model/tiny.yaml]
    overrides: {trainer.max_steps: 300}
    grid:
      data: [configs/data/copy.yaml]                      # an axis of config files (or lists of them)
      position: [configs/position/cope.yaml, configs/position/rope.yaml]
      data.init_args.seq_len: [32]                        # a dotted key: an axis of --key=value overrides
      seed: [0, 1]                                        # --seed_everything and data.init_args.seed
    test: true                                            # `cope-pl test` on the last checkpoint
    eval_context: {lengths: [1x, 2x, 4x]}                 # `cope-pl eval-context` afterwards
    passkey: {lengths: [1x, 2x, 4x, 8x]}                  # `cope-pl passkey` (passkey runs) afterwards
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00", max_parallel: 8}

Every cell is one run in `<save_dir>/<cell name>/version_0` (the name joins the cell's labels, e.g.
`copy-cope-seq_len32-seed0`), so a re-run finds what is done: a step is complete when its output exists
(fit: results.json, test: test/ metrics in it, eval-context: eval_context.json, passkey: passkey.csv) and is
skipped. A failed step is recorded in `<save_dir>/status/<cell>.json` with its log file, and the sweep goes on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cope_pl.launch import sbatch_header
from cope_pl.results import read_results
from cope_pl.runs import EVAL_CONTEXT_FILE, PASSKEY_FILE, RESULTS_FILE, sweep_cell_dir, sweep_status_file

MANIFEST = "sweep.json"
SWEEP_KEYS = {"name", "save_dir", "configs", "overrides", "grid", "test", "eval_context", "passkey", "slurm"}
SWEEP_KEYS |= {"report", "python"}
# Steps that score a finished run in one process (no srun across the job's tasks).
SCORING_STEPS = ("eval-context", "passkey")


@dataclass
class Cell:
    index: int
    name: str
    keys: dict[str, Any]  # axis -> label, for reports
    configs: list[str]
    overrides: dict[str, Any]
    seed: int | None = None


@dataclass
class Sweep:
    name: str
    file: Path
    save_dir: Path
    cells: list[Cell]
    axes: list[str]
    test: bool = True
    eval_context: dict[str, Any] | None = None
    passkey: dict[str, Any] | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable

    def run_dir(self, cell: Cell) -> Path:
        return sweep_cell_dir(self.save_dir, cell.name)

    def steps(self) -> list[str]:
        scoring = (["eval-context"] if self.eval_context else []) + (["passkey"] if self.passkey is not None else [])
        return ["fit"] + (["test"] if self.test else []) + scoring


# Loading ------------------------------------------------------------------------------------------------
def label(value: Any) -> str:
    """A short, path-safe label: the file stem for a config, the value itself otherwise."""
    if isinstance(value, (list, tuple)):
        return "+".join(label(v) for v in value)
    text = Path(value).stem if isinstance(value, str) and value.endswith((".yaml", ".yml")) else str(value)
    return "".join(c if c.isalnum() or c in "._+=" else "_" for c in text)


def axis_choices(axis: str, values: list[Any]) -> list[tuple[str, list[str], dict[str, Any], int | None]]:
    """(label, config files, overrides, seed) for every value of one axis."""
    if not isinstance(values, list) or not values:
        raise ValueError(f"grid.{axis} must be a non-empty list, got {values!r}")
    choices = []
    for value in values:
        if axis == "seed":  # seeds the training data too; evaluation sets follow data.init_args.eval_seed
            choices.append((f"seed{int(value)}", [], {"data.init_args.seed": int(value)}, int(value)))
        elif "." in axis:
            choices.append((f"{axis.rsplit('.', 1)[-1]}{label(value)}", [], {axis: value}, None))
        elif isinstance(value, dict):  # {label: ..., configs: [...], overrides: {...}}
            configs = list(value.get("configs") or [])
            name = value.get("label") or label(configs)
            choices.append((str(name), configs, dict(value.get("overrides") or {}), None))
        else:
            configs = list(value) if isinstance(value, (list, tuple)) else [value]
            choices.append((label(configs), configs, {}, None))
    return choices


def check_files(sweep_file: Path, where: str, configs: list[str]) -> None:
    for config in configs:
        if not Path(config).is_file():
            raise FileNotFoundError(
                f"sweep {sweep_file}: {where} names {config}, which does not exist (paths are relative to the "
                "directory the sweep runs from, the repository root); create it or fix the name"
            )


def load_sweep(path: str | Path, save_dir: str | Path | None = None) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} not found")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ValueError(f"sweep {path}: unknown keys {sorted(unknown)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"sweep {path}: `grid` must map axis names to lists of values")
    name = spec.get("name") or path.stem
    base_configs = list(spec.get("configs") or [])
    check_files(path, "configs", base_configs)
    axes = list(grid)
    per_axis = [axis_choices(axis, grid[axis]) for axis in axes]
    for axis, choices in zip(axes, per_axis):
        for _, configs, _, _ in choices:
            check_files(path, f"grid.{axis}", configs)
    cells = []
    for index, combo in enumerate(itertools.product(*per_axis)):
        seed = next((c[3] for c in combo if c[3] is not None), None)
        overrides = dict(spec.get("overrides") or {})
        for choice in combo:
            overrides.update(choice[2])
        cells.append(
            Cell(
                index=index,
                name="-".join(c[0] for c in combo),
                keys={axis: c[0] for axis, c in zip(axes, combo)},
                configs=base_configs + [f for c in combo for f in c[1]],
                overrides=overrides,
                seed=seed,
            )
        )
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep {path}: two cells share a name; give the grid values distinct labels")
    return Sweep(
        name=name,
        file=path,
        save_dir=Path(save_dir or spec.get("save_dir") or Path("runs") / "sweeps" / name),
        cells=cells,
        axes=axes,
        test=bool(spec.get("test", True)),
        eval_context=spec.get("eval_context"),
        passkey=spec.get("passkey"),
        slurm=dict(spec.get("slurm") or {}),
        report=dict(spec.get("report") or {}),
        python=spec.get("python") or sys.executable,
    )


# Commands -----------------------------------------------------------------------------------------------
def override_args(overrides: dict[str, Any]) -> list[str]:
    def text(value: Any) -> str:
        return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)

    return [f"--{key}={text(value)}" for key, value in overrides.items()]


def lightning_command(sweep: Sweep, cell: Cell, stage: str, extra: dict[str, Any] | None = None) -> list[str]:
    cmd = [sweep.python, "-m", "cope_pl.cli", stage]
    for config in cell.configs:
        cmd += ["--config", config]
    cmd += override_args(cell.overrides)
    if cell.seed is not None:
        cmd.append(f"--seed_everything={cell.seed}")
    logger = {
        "trainer.logger.init_args.save_dir": str(sweep.save_dir),
        "trainer.logger.init_args.name": cell.name,
        "trainer.logger.init_args.version": 0,
    }
    return cmd + override_args({**logger, **(extra or {})})


def step_command(sweep: Sweep, cell: Cell, step: str, extra: dict[str, Any] | None = None) -> list[str]:
    run = sweep.run_dir(cell)
    if step == "fit":  # a cell killed mid-fit continues from its last checkpoint when the sweep is re-run
        return lightning_command(sweep, cell, "fit", {"ckpt_path": "last", **(extra or {})})
    if step == "test":  # in place: the run's own config, checkpoint and directory (`cope-pl test RUN_DIR`)
        return [sweep.python, "-m", "cope_pl.cli", "test", str(run)] + override_args(extra or {})
    if step == "passkey":
        options = sweep.passkey or {}
        cmd = [sweep.python, "-m", "cope_pl.cli", "passkey", str(run)]
        cmd += ["--lengths", *[str(x) for x in options.get("lengths", ["1x", "2x", "4x", "8x"])]]
        if options.get("depths") is not None:
            cmd += ["--depths", *[str(x) for x in options["depths"]]]
        keys = ("samples", "batch_size", "memory_gb")
    else:
        options = sweep.eval_context or {}
        cmd = [sweep.python, "-m", "cope_pl.cli", "eval-context", str(run)]
        cmd += ["--lengths", *[str(x) for x in options.get("lengths", ["1x", "2x"])]]
        keys = ("stride", "batch_size", "limit_tokens", "limit_batches", "memory_gb")  # limit_batches: refused
    for key in keys:
        if options.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(options[key])]
    return cmd


# Completion and status ----------------------------------------------------------------------------------
def step_done(sweep: Sweep, cell: Cell, step: str) -> bool:
    run = sweep.run_dir(cell)
    results = run / RESULTS_FILE
    if step == "fit":
        return results.is_file()
    if step == "test":
        return results.is_file() and any(k.startswith("test/") for k in read_results(results).get("metrics", {}))
    if step == "eval-context":
        return (run / EVAL_CONTEXT_FILE).is_file()
    if step == "passkey":
        return (run / PASSKEY_FILE).is_file()
    return all(step_done(sweep, cell, s) for s in sweep.steps())  # "all"


def status_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep_status_file(sweep.save_dir, cell.name)


def record(sweep: Sweep, cell: Cell, status: str, **details: Any) -> None:
    path = status_path(sweep, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cell": cell.name, "status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **details}
    path.write_text(json.dumps(payload, indent=2))


def cell_status(sweep: Sweep, cell: Cell) -> str:
    if step_done(sweep, cell, "all"):
        return "done"
    path = status_path(sweep, cell)
    return json.loads(path.read_text())["status"] if path.is_file() else "pending"


def write_manifest(sweep: Sweep) -> None:
    """What the report needs to group runs by swept keys and to list cells that have no results yet."""
    sweep.save_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": sweep.name,
        "file": str(sweep.file),
        "axes": sweep.axes,
        "report": sweep.report,
        "cells": [{"name": c.name, "keys": c.keys, "run_dir": str(sweep.run_dir(c))} for c in sweep.cells],
    }
    (sweep.save_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


# Running ------------------------------------------------------------------------------------------------
def run_cell(sweep: Sweep, cell: Cell, log=print) -> str:
    """Run the cell's missing steps; 'done', 'skipped' (already complete) or 'failed'."""
    if step_done(sweep, cell, "all"):
        return "skipped"
    logs = sweep.save_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{cell.name}.log"
    if not step_done(sweep, cell, "fit") and sweep.run_dir(cell).exists():
        shutil.rmtree(sweep.run_dir(cell))  # an interrupted fit: start the cell again from scratch
    for step in sweep.steps():
        if step_done(sweep, cell, step):
            continue
        cmd = step_command(sweep, cell, step, {})
        start = time.time()
        with open(log_file, "a") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        log(f"  {step}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.time() - start:.0f} s")
        if code != 0:
            record(sweep, cell, "failed", step=step, returncode=code, log=str(log_file))
            return "failed"
    record(sweep, cell, "done", log=str(log_file))
    return "done"


def run_sweep(sweep: Sweep, cells: list[Cell] | None = None, log=print) -> dict[str, str]:
    write_manifest(sweep)
    outcome = {}
    cells = sweep.cells if cells is None else cells
    for n, cell in enumerate(cells, 1):
        log(f"[{n}/{len(cells)}] {cell.name}")
        outcome[cell.name] = run_cell(sweep, cell, log)
        if outcome[cell.name] == "skipped":
            log("  complete already; skipped")
    failed = [name for name, status in outcome.items() if status == "failed"]
    log(f"{len(outcome) - len(failed)} of {len(outcome)} cells complete" + (f"; failed: {failed}" if failed else ""))
    return outcome


# SLURM --------------------------------------------------------------------------------------------------
def slurm_script(sweep: Sweep, sweep_file: Path) -> str:
    """An array job, one task per cell; each step runs under srun so Lightning reads the SLURM environment
    (one process per GPU, DDP across `nodes`), and eval-context and passkey run as one process."""
    s = sweep.slurm
    nodes, gpus = int(s.get("nodes", 1)), int(s.get("gpus_per_node", 1))
    array = f"0-{len(sweep.cells) - 1}" + (f"%{s['max_parallel']}" if s.get("max_parallel") else "")
    header = sbatch_header(
        job_name=sweep.name,
        nodes=nodes,
        gpus_per_node=gpus,
        output=f"{sweep.save_dir / 'logs'}/%x-%a.out",
        cpus_per_task=int(s.get("cpus_per_task", 8)),
        time=s.get("time", "24:00:00"),
        partition=s.get("partition"),
        array=array,
        extra=s.get("extra", []),
    )
    sweep_cmd = shlex.join(
        [sweep.python, "-m", "cope_pl.cli", "sweep", str(sweep_file), "--save-dir", str(sweep.save_dir)]
    )
    body = [
        "set -uo pipefail",
        f"SWEEP=({sweep_cmd})",
        "# step CELL STEP COMMAND...: skip a step whose output exists; record a failure and stop the task.",
        "step() {",
        "  local cell=$1 name=$2; shift 2",
        '  if "${SWEEP[@]}" --step-done "$cell" "$name"; then echo "cell $cell: $name complete, skipped"; return; fi',
        '  "$@" || { "${SWEEP[@]}" --record "$cell" failed "$name"; exit 1; }',
        "}",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    extra = {"trainer.num_nodes": nodes, "prepare_data_per_node": False} if nodes > 1 else {}
    for cell in sweep.cells:
        body.append(f"  {cell.index})  # {cell.name}")
        for step in sweep.steps():
            scoring = step in SCORING_STEPS
            launcher = ["srun", "--ntasks=1", "--nodes=1"] if scoring else ["srun"]
            cmd = launcher + step_command(sweep, cell, step, None if scoring else extra)
            body.append(f"    step {cell.index} {step} {shlex.join(cmd)}")
        body.append(f'    "${{SWEEP[@]}}" --record {cell.index} done all')
        body.append("    ;;")
    body += ['  *) echo "no cell $SLURM_ARRAY_TASK_ID in this sweep"; exit 1 ;;', "esac"]
    return "\n".join(header + [""] + body) + "\n"


def write_slurm(sweep: Sweep, submit: bool) -> Path:
    write_manifest(sweep)
    (sweep.save_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = sweep.save_dir / f"{sweep.name}.sbatch"
    path.write_text(slurm_script(sweep, sweep.file))
    path.chmod(0o755)
    print(f"SLURM array job for {len(sweep.cells)} cells written to {path}")
    if submit:
        if shutil.which("sbatch") is None:
            raise FileNotFoundError("sbatch is not on PATH; submit the script on the cluster: sbatch " + str(path))
        subprocess.run(["sbatch", str(path)], check=True)
    return path


# CLI ----------------------------------------------------------------------------------------------------
def find_cell(sweep: Sweep, ref: str) -> Cell:
    for cell in sweep.cells:
        if ref in (str(cell.index), cell.name):
            return cell
    raise ValueError(f"sweep {sweep.file} has no cell {ref!r} (cells are 0..{len(sweep.cells) - 1} or their names)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--save-dir", default=None, help="default: the file's save_dir, else runs/sweeps/<name>")
    parser.add_argument("--cell", action="append", help="run only this cell (index or name); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="print each cell's commands and status")
    parser.add_argument("--slurm", action="store_true", help="write a SLURM array script instead of running")
    parser.add_argument("--submit", action="store_true", help="with --slurm: also sbatch it")
    parser.add_argument("--step-done", nargs=2, metavar=("CELL", "STEP"), help="exit 0 if that step is complete")
    parser.add_argument("--record", nargs=3, metavar=("CELL", "STATUS", "STEP"), help="record a cell's status")
    args = parser.parse_args(argv)
    sweep = load_sweep(args.file, args.save_dir)
    if args.step_done:
        cell, step = find_cell(sweep, args.step_done[0]), args.step_done[1]
        sys.exit(0 if step_done(sweep, cell, step) else 1)
    if args.record:
        record(sweep, find_cell(sweep, args.record[0]), args.record[1], step=args.record[2])
        return
    if args.slurm:
        write_slurm(sweep, args.submit)
        return
    cells = [find_cell(sweep, ref) for ref in args.cell] if args.cell else sweep.cells
    if args.dry_run:
        for cell in cells:
            print(f"[{cell.index}] {cell.name}: {cell_status(sweep, cell)}")
            for step in sweep.steps():
                print("   ", shlex.join(step_command(sweep, cell, step, {})))
        return
    outcome = run_sweep(sweep, cells)
    if "failed" in outcome.values():
        sys.exit(1)
