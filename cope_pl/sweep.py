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
    checkpoint: best                                      # or: test and score the lowest-val/loss checkpoint
    eval_context: {lengths: [1x, 2x, 4x]}                 # `cope-pl eval-context` afterwards
    passkey: {lengths: [1x, 2x, 4x, 8x]}                  # `cope-pl passkey` (passkey runs) afterwards
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00", max_parallel: 8}

Every cell is one run in `<save_dir>/<cell name>/version_0` (the name joins the cell's labels, e.g.
`copy-cope-seq_len32-seed0`), so a re-run finds what is done: a step is complete when its output exists
(fit: results.json, test: test/ metrics in it, eval-context: unscaled rows in eval_context.json, passkey:
unscaled rows in passkey.csv) and is skipped. A failed step is recorded in `<save_dir>/status/<cell>.json` with
its log file, and the sweep goes on.

A `rope_scaling` list in eval_context or passkey, e.g. `eval_context: {lengths: [1x, 4x], rope_scaling: [{type:
yarn, factor: 4}]}`, adds one step per scaling (`eval-context:yarn4`: the same command with `--rope-scaling yarn
--rope-factor 4`) to the cells whose model has RoPE (`rope`, `rope_cope`, `rope+...`); other cells have no such
step. It is complete when the file has that scaling's rows (`yarn×4`).
"""

from __future__ import annotations

import argparse
import csv
import inspect
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

from cope_pl.launch import OMP_LINE, Resources, config_value, resolve_resources, run_settings, sbatch_header
from cope_pl.position import ModelDims
from cope_pl.position.rope_scaling import ROPE_TYPES, RopeScaling, has_rope
from cope_pl.results import read_results
from cope_pl.runs import (
    CHECKPOINTS_DIR,
    EVAL_CONTEXT_FILE,
    PASSKEY_FILE,
    RESULTS_FILE,
    sweep_cell_dir,
    sweep_status_file,
)

MANIFEST = "sweep.json"
SWEEP_KEYS = {"name", "save_dir", "configs", "overrides", "grid", "test", "eval_context", "passkey", "slurm"}
SWEEP_KEYS |= {"report", "python", "checkpoint"}
# `checkpoint:` which checkpoint test and scoring read: the fit's last one, or the one with the lowest val/loss
# (kept as checkpoints/best.ckpt beside last.ckpt; for data small enough to overfit within the step budget).
CHECKPOINT_CHOICES = ("last", "best")
BEST_CHECKPOINT = {
    "checkpoint.monitor": "val/loss",
    "checkpoint.mode": "min",
    "checkpoint.save_top_k": 1,
    "checkpoint.filename": "best",
}
# Steps that score a finished run in one process (no srun across the job's tasks), with or without a RoPE
# scaling (`eval-context:yarn4`).
SCORING_STEPS = ("eval-context", "passkey")


@dataclass
class Cell:
    index: int
    name: str
    keys: dict[str, Any]  # axis -> label, for reports
    configs: list[str]
    overrides: dict[str, Any]
    seed: int | None = None
    rope: bool = False  # the model has RoPE: the rope_scaling steps of eval_context and passkey apply


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
    checkpoint: str = "last"

    def run_dir(self, cell: Cell) -> Path:
        return sweep_cell_dir(self.save_dir, cell.name)

    def scored(self, cell: Cell) -> Path:
        """What test, eval-context and passkey read: the run (its last checkpoint) or its best checkpoint."""
        run = self.run_dir(cell)
        return run / CHECKPOINTS_DIR / "best.ckpt" if self.checkpoint == "best" else run

    def rope_scalings(self, kind: str) -> list[tuple[str, float]]:
        """(rope_type, factor) of every rope_scaling entry of eval_context or passkey (`kind`)."""
        options = self.eval_context if kind == "eval-context" else self.passkey
        return [(entry["type"], float(entry["factor"])) for entry in (options or {}).get("rope_scaling") or []]

    def steps(self, cell: Cell) -> list[str]:
        steps = ["fit"] + (["test"] if self.test else [])
        for kind, wanted in (("eval-context", bool(self.eval_context)), ("passkey", self.passkey is not None)):
            if wanted:
                scaled = [scaled_step(kind, *scaling) for scaling in self.rope_scalings(kind)] if cell.rope else []
                steps += [kind, *scaled]
        return steps


def scaled_step(kind: str, rope_type: str, factor: float) -> str:
    """The name of an eval-context or passkey step with this RoPE scaling: `eval-context:yarn4`."""
    return f"{kind}:{rope_type}{factor:g}"


def step_scaling(sweep: Sweep, step: str) -> tuple[str, float] | None:
    """The (rope_type, factor) a scoring step runs with; None for the unscaled step."""
    kind = step.split(":")[0]
    for scaling in sweep.rope_scalings(kind):
        if scaled_step(kind, *scaling) == step:
            return scaling
    if ":" in step:
        raise ValueError(f"sweep {sweep.file} has no step {step!r}")
    return None


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


def check_rope_scaling(path: Path, key: str, options: Any) -> bool:
    """`key`.rope_scaling, if given, is a list of {type: linear|dynamic|yarn, factor: >= 1}; whether it is given."""
    entries = options.get("rope_scaling") if isinstance(options, dict) else None
    if entries is None:
        return False
    fix = "give a list such as [{type: yarn, factor: 4}]"
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"sweep {path}: {key}.rope_scaling must be a non-empty list; {fix}")
    for entry in entries:
        ok = isinstance(entry, dict) and set(entry) == {"type", "factor"} and entry["type"] in ROPE_TYPES
        if not ok or isinstance(entry["factor"], bool) or not isinstance(entry["factor"], (int, float)):
            raise ValueError(f"sweep {path}: {key}.rope_scaling entry {entry!r} is not {{type: one of "
                             f"{list(ROPE_TYPES)}, factor: a number}}; {fix}")  # fmt: skip
        if not entry["factor"] >= 1:
            raise ValueError(f"sweep {path}: {key}.rope_scaling factor {entry['factor']} must be >= 1")
    return True


def model_has_rope(configs: list[str], overrides: dict[str, Any]) -> bool:
    """Whether the model these configs and overrides build has RoPE (model.position; the model's default: rope)."""
    from cope_pl.lm import LanguageModel

    defaults = inspect.signature(LanguageModel.__init__).parameters
    model = {}
    for key in ("position", "position_options", "n_layers", "n_heads", "d_model", "max_seq_len"):
        value = config_value(configs, overrides, f"model.{key}")
        model[key] = defaults[key].default if value is None else value
    dims = ModelDims(int(model["n_layers"]), int(model["n_heads"]), int(model["d_model"]), int(model["max_seq_len"]))
    return has_rope(str(model["position"]), model["position_options"], dims)


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
    scaled = [check_rope_scaling(path, key, spec.get(key)) for key in ("eval_context", "passkey")]
    checkpoint = str(spec.get("checkpoint", "last"))
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"sweep {path}: checkpoint must be one of {list(CHECKPOINT_CHOICES)}, got {checkpoint!r}")
    cells = []
    for index, combo in enumerate(itertools.product(*per_axis)):
        seed = next((c[3] for c in combo if c[3] is not None), None)
        overrides = dict(spec.get("overrides") or {})
        for choice in combo:
            overrides.update(choice[2])
        configs = base_configs + [f for c in combo for f in c[1]]
        cells.append(
            Cell(
                index=index,
                name="-".join(c[0] for c in combo),
                keys={axis: c[0] for axis, c in zip(axes, combo)},
                configs=configs,
                overrides=overrides,
                seed=seed,
                rope=any(scaled) and model_has_rope(configs, overrides),
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
        checkpoint=checkpoint,
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
    run = sweep.scored(cell)
    if step == "fit":  # a cell killed mid-fit continues from its last checkpoint when the sweep is re-run
        best = BEST_CHECKPOINT if sweep.checkpoint == "best" else {}
        return lightning_command(sweep, cell, "fit", {**best, "ckpt_path": "last", **(extra or {})})
    if step == "test":  # in place: the run's own config and directory (`cope-pl test RUN_DIR`)
        return [sweep.python, "-m", "cope_pl.cli", "test", str(run)] + override_args(extra or {})
    if step.startswith("passkey"):  # passkey, or passkey:<scaling>
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
    scaling = step_scaling(sweep, step)
    if scaling is not None:
        cmd += ["--rope-scaling", scaling[0], "--rope-factor", f"{scaling[1]:g}"]
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
    if step.split(":")[0] in SCORING_STEPS:
        scaling = step_scaling(sweep, step)
        label = "" if scaling is None else RopeScaling(*scaling, original_max_position_embeddings=1).label
        return label in scored_scalings(run / (EVAL_CONTEXT_FILE if step.startswith("eval-context") else PASSKEY_FILE))
    return all(step_done(sweep, cell, s) for s in sweep.steps(cell))  # "all"


def scored_scalings(path: Path) -> set[str]:
    """The RoPE scalings ("" for none) that a run's eval_context.json or passkey.csv has rows of."""
    if not path.is_file():
        return set()
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return {row.get("rope_scaling") or "" for row in csv.DictReader(f)}
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        return set()  # a file cut short: the step runs again and rewrites it
    return {row.get("rope_scaling") or "" for row in rows if isinstance(row, dict)} if isinstance(rows, list) else set()


def status_path(sweep: Sweep, cell: Cell) -> Path:
    return sweep_status_file(sweep.save_dir, cell.name)


def record(sweep: Sweep, cell: Cell, status: str, **details: Any) -> None:
    path = status_path(sweep, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cell": cell.name, "status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **details}
    path.write_text(json.dumps(payload, indent=2))


def cell_status(sweep: Sweep, cell: Cell) -> str:
    """done, pending, or the last recorded status: failed, running, timeout (killed at the SLURM time limit)
    or killed (scancel, requeue), with the step and the log."""
    if step_done(sweep, cell, "all"):
        return "done"
    path = status_path(sweep, cell)
    if not path.is_file():
        return "pending"
    status = json.loads(path.read_text())
    where = [f"in {status['step']}"] if status.get("step") not in (None, "all") else []
    where += [f"SLURM job {status['slurm_job']}"] if status.get("slurm_job") else []
    where += [f"log {status['log']}"] if status.get("log") else []
    return status["status"] + (f" ({', '.join(where)})" if where else "")


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
    for step in sweep.steps(cell):
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
SLURM_ONLY_KEYS = ("max_parallel",)

# The array task's shell functions. Every status change is written by the script itself, atomically, in the
# format of `record` below: the SIGTERM handler has only SLURM's KillWait seconds before SIGKILL, too few to
# start Python and torch.
JOB_FUNCTIONS = r"""JOB="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"
STEP=start
# record STATUS STEP [RETURNCODE]: this cell's status file (see `cope-pl sweep --dry-run`).
record() {
  local tmp="$STATUS.$SLURM_JOB_ID.tmp"
  mkdir -p "$(dirname "$STATUS")"
  printf '{"cell": "%s", "status": "%s", "step": "%s", "time": "%s", "slurm_job": "%s", "log": "%s"%s}\n' \
    "$CELL" "$1" "$2" "$(date '+%Y-%m-%d %H:%M:%S')" "$JOB" "$LOG" "${3:+, \"returncode\": $3}" >"$tmp"
  mv "$tmp" "$STATUS"
}
# SIGTERM comes at the time limit (recorded as timeout), from scancel or before a requeue.
on_term() {
  local reason
  reason=$(squeue -h -j "$SLURM_JOB_ID" -o %r 2>/dev/null)
  if [ "$reason" = TimeLimit ]; then record timeout "$STEP"; else record killed "$STEP"; fi
  exit 143
}
trap on_term TERM
# step NAME COMMAND...: skip a step whose output exists; record a failure and stop the task.
step() {
  local name=$1 code
  shift
  if "${SWEEP[@]}" --step-done "$CELL" "$name"; then echo "cell $CELL: $name complete, skipped"; return; fi
  STEP=$name
  "$@" &  # in the background: `wait` returns at once on SIGTERM, so the handler runs in time
  wait $!
  code=$?
  if [ $code -ne 0 ]; then record failed "$name" $code; exit 1; fi
}"""


def slurm_resources(sweep: Sweep) -> Resources:
    """The array's resources: the file's `slurm:` section, the rest from the cells' own configs (GPUs only
    for a GPU trainer, CPUs for the data-loader workers)."""
    options = {k: v for k, v in sweep.slurm.items() if k not in SLURM_ONLY_KEYS}
    settings = [run_settings(cell.configs, cell.overrides) for cell in sweep.cells]
    if len({s.gpu for s in settings}) > 1:
        raise ValueError(f"sweep {sweep.file}: some cells train on GPUs and some do not; split them in two sweeps")
    widest = max(settings, key=lambda s: s.num_workers)
    return resolve_resources(widest, options, f"sweep {sweep.file}: slurm")


def array_spec(indices: list[int]) -> str:
    """SLURM's --array list of these task ids, e.g. 0-3,5,7-8."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def unfinished(sweep: Sweep) -> list[Cell]:
    return [cell for cell in sweep.cells if not step_done(sweep, cell, "all")]


def log_name(sweep: Sweep) -> str:
    return f"{sweep.save_dir / 'logs'}/{sweep.name}-%A_%a.out"  # %A_%a: array job and task, kept over a requeue


def slurm_script(sweep: Sweep, sweep_file: Path, cells: list[Cell] | None = None) -> str:
    """An array job, one task per cell (only `cells`, by default those not complete); each step runs under srun
    so Lightning reads the SLURM environment (one process per device, DDP across `nodes`), and eval-context and
    passkey run as one process."""
    resources = slurm_resources(sweep)
    cells = unfinished(sweep) if cells is None else cells
    if not cells:
        raise ValueError(f"sweep {sweep.file}: every cell is complete; nothing to submit")
    limit = sweep.slurm.get("max_parallel")
    array = array_spec([cell.index for cell in cells]) + (f"%{limit}" if limit else "")
    header = sbatch_header(sweep.name, resources, log_name(sweep), array=array)
    sweep_cmd = [sweep.python, "-m", "cope_pl.cli", "sweep", str(sweep_file), "--save-dir", str(sweep.save_dir)]
    log = str(sweep.save_dir / "logs" / sweep.name) + '-"$JOB".out'
    body = ["set -uo pipefail", OMP_LINE, f"SWEEP=({shlex.join(sweep_cmd)})", JOB_FUNCTIONS]
    body.append('case "$SLURM_ARRAY_TASK_ID" in')
    extra = {"trainer.num_nodes": resources.nodes, "trainer.devices": resources.tasks_per_node}
    extra |= {"prepare_data_per_node": False} if resources.nodes > 1 else {}
    for cell in cells:
        body.append(f"  {cell.index})  # {cell.name}")
        body.append(f"    CELL={shlex.quote(cell.name)} STATUS={shlex.quote(str(status_path(sweep, cell)))} LOG={log}")
        body.append("    record running start")
        for step in sweep.steps(cell):
            scoring = step.split(":")[0] in SCORING_STEPS
            launcher = ["srun", "--ntasks=1", "--nodes=1"] if scoring else ["srun"]
            cmd = launcher + step_command(sweep, cell, step, None if scoring else extra)
            body.append(f"    step {step} {shlex.join(cmd)}")
        body.append("    record done all")
        body.append("    ;;")
    body += ['  *) echo "no cell $SLURM_ARRAY_TASK_ID to run in this array job"; exit 1 ;;', "esac"]
    return "\n".join(header + [""] + body) + "\n"


def write_slurm(sweep: Sweep, submit: bool) -> Path | None:
    """The array script for the unfinished cells (None when every cell is complete), submitted if asked."""
    write_manifest(sweep)
    cells = unfinished(sweep)
    if not cells:
        print(f"every cell of {sweep.name} is complete; nothing to submit")
        return None
    (sweep.save_dir / "logs").mkdir(parents=True, exist_ok=True)
    path = sweep.save_dir / f"{sweep.name}.sbatch"
    path.write_text(slurm_script(sweep, sweep.file, cells))
    path.chmod(0o755)
    print(f"SLURM array job for {len(cells)} of {len(sweep.cells)} cells written to {path}")
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
            for step in sweep.steps(cell):
                print("   ", shlex.join(step_command(sweep, cell, step, {})))
        return
    outcome = run_sweep(sweep, cells)
    if "failed" in outcome.values():
        sys.exit(1)
