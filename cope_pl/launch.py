"""`cope-pl launch slurm|torchrun`: job scripts for one training run on N nodes, one process per device.

Lightning reads the cluster from the environment (SLURM_* under srun, the torchrun variables under
torchrun), so a launch only has to start one process per device with matching `trainer.num_nodes` and
`trainer.devices`. Data is prepared once per shared filesystem (`--prepare_data_per_node=false`), and
`--ckpt_path last` makes a requeued or resubmitted job continue where it stopped.

    cope-pl launch slurm --nodes 2 --gpus-per-node 8 --out job.sbatch --submit -- --config configs/trainer/gpu_ddp.yaml
    cope-pl launch slurm --tasks-per-node 2 -- --config configs/trainer/cpu.yaml --trainer.strategy=ddp ...
    cope-pl launch torchrun --nodes 2 --gpus-per-node 8 --rdzv-endpoint host:29500 -- --config ...

The resources are read from the run's own config where it says them: GPUs are asked for only when
`trainer.accelerator` is a GPU (their count defaults to `trainer.devices`), and `--cpus-per-task` defaults to
one CPU per process plus one per data-loader worker (`data.init_args.num_workers`).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GPU_ACCELERATORS = ("gpu", "cuda")
# Lightning's SLURM convention: SIGUSR1 this many seconds before the time limit; it saves and requeues.
SIGNAL_SECONDS = 90
# The sweep file's `slurm:` keys (launch has a flag for each, dashes for underscores).
RESOURCE_KEYS = (
    "nodes",
    "gpus_per_node",
    "tasks_per_node",
    "cpus_per_task",
    "mem",
    "mem_per_gpu",
    "time",
    "partition",
    "account",
    "qos",
    "constraint",
    "extra",
)


# What the run's config says ---------------------------------------------------------------------------
def split_fit_args(fit_args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(--config files, --key=value overrides) of a `cope-pl fit` command line, in order."""
    configs, overrides = [], {}
    i = 0
    while i < len(fit_args):
        arg = fit_args[i]
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            if not has_value and i + 1 < len(fit_args) and not fit_args[i + 1].startswith("--"):
                value, i = fit_args[i + 1], i + 1
            if key == "config":
                configs.append(value)
            else:
                overrides[key] = yaml.safe_load(value) if value else True
        i += 1
    return configs, overrides


def lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def config_value(configs: list[str], overrides: dict[str, Any], key: str, aliases: tuple[str, ...] = ()) -> Any:
    """The value `key` (or an alias of it) ends up with: later config files win, overrides win over files."""
    value = None
    for config in configs:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such file (paths are relative to the directory you run in)")
        tree = yaml.safe_load(path.read_text()) or {}
        for name in (key, *aliases):
            found, found_value = lookup(tree, name)
            value = found_value if found else value
    for name in (key, *aliases):
        value = overrides.get(name, value)
    return value


@dataclass
class RunSettings:
    """The part of a run's config a job script must agree with."""

    accelerator: str = "auto"
    devices: Any = None
    num_workers: int = 0

    @property
    def gpu(self) -> bool:
        return self.accelerator in GPU_ACCELERATORS


def run_settings(configs: list[str], overrides: dict[str, Any]) -> RunSettings:
    workers = config_value(configs, overrides, "data.init_args.num_workers", aliases=("data.num_workers",))
    return RunSettings(
        accelerator=str(config_value(configs, overrides, "trainer.accelerator") or "auto").lower(),
        devices=config_value(configs, overrides, "trainer.devices"),
        num_workers=int(workers or 0),
    )


# What the job asks SLURM for ----------------------------------------------------------------------------
@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # processes per node: trainer.devices
    cpus_per_task: int = 1
    time: str = "24:00:00"
    mem: str | None = None  # per node, e.g. 64G
    mem_per_gpu: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    extra: list[str] = field(default_factory=list)  # further directives, e.g. ["--exclusive"]


def resolve_resources(settings: RunSettings, options: dict[str, Any], where: str) -> Resources:
    """Resources from explicit options (None: not given) and the run's config; ValueError names a conflict."""
    given = {key: value for key, value in options.items() if value is not None}
    unknown = set(given) - set(RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown SLURM settings {sorted(unknown)}; known: {', '.join(RESOURCE_KEYS)}")
    devices = settings.devices if isinstance(settings.devices, int) and settings.devices > 0 else None
    gpus = given.get("gpus_per_node")
    if settings.gpu:
        gpus = devices or 1 if gpus is None else int(gpus)
        if gpus < 1:
            raise ValueError(
                f"{where}: trainer.accelerator={settings.accelerator} needs GPUs; set gpus_per_node >= 1, "
                "or train on the CPU with --trainer.accelerator=cpu"
            )
    elif settings.accelerator != "auto" and gpus:
        raise ValueError(
            f"{where}: gpus_per_node={gpus} but trainer.accelerator={settings.accelerator}: the GPUs would sit idle; "
            "set gpus_per_node to 0 or use a GPU trainer config"
        )
    gpus = int(gpus or 0)
    tasks = given.get("tasks_per_node")
    if gpus:  # one process per GPU
        if tasks is not None and int(tasks) != gpus:
            raise ValueError(f"{where}: tasks_per_node={tasks} with gpus_per_node={gpus}; one process per GPU")
        tasks = gpus
    tasks = int(tasks if tasks is not None else devices or 1)
    resources = Resources(
        nodes=int(given.get("nodes", 1)),
        gpus_per_node=gpus,
        tasks_per_node=tasks,
        cpus_per_task=int(given.get("cpus_per_task", 1 + settings.num_workers)),
        extra=[str(line) for line in given.get("extra", [])],
        **{
            key: str(given[key])
            for key in ("time", "mem", "mem_per_gpu", "partition", "account", "qos", "constraint")
            if key in given
        },
    )
    if resources.nodes < 1 or resources.tasks_per_node < 1 or resources.cpus_per_task < 1:
        raise ValueError(f"{where}: nodes, tasks_per_node and cpus_per_task must be >= 1")
    if resources.mem and resources.mem_per_gpu:
        raise ValueError(f"{where}: give mem or mem_per_gpu, not both (SLURM refuses the pair)")
    if resources.mem_per_gpu and not gpus:
        raise ValueError(f"{where}: mem_per_gpu without GPUs; use mem (per node) instead")
    for line in resources.extra:
        if not line.startswith("-"):
            raise ValueError(f"{where}: extra directive {line!r} must be an sbatch option such as --exclusive")
    return resources


def sbatch_header(
    job_name: str, resources: Resources, output: str, array: str | None = None, chdir: Path | None = None
) -> list[str]:
    """#SBATCH lines for one task per device on every node; shared by single runs and sweep array jobs.

    Requeue and SIGUSR1 before the time limit: Lightning saves a checkpoint and requeues the job, and the
    resubmitted fit resumes. The log is appended to, so a requeued job keeps its first attempt's output."""
    r = resources
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={r.nodes}",
        f"#SBATCH --ntasks-per-node={r.tasks_per_node}",
        f"#SBATCH --cpus-per-task={r.cpus_per_task}",
    ]
    lines += [f"#SBATCH --gpus-per-node={r.gpus_per_node}"] if r.gpus_per_node else []
    lines += [f"#SBATCH --mem={r.mem}"] if r.mem else []
    lines += [f"#SBATCH --mem-per-gpu={r.mem_per_gpu}"] if r.mem_per_gpu else []
    lines += [
        f"#SBATCH --time={r.time}",
        f"#SBATCH --output={output}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={chdir or Path.cwd()}",  # config paths are relative to the repository root
        "#SBATCH --requeue",
        f"#SBATCH --signal=SIGUSR1@{SIGNAL_SECONDS}",
    ]
    lines += [f"#SBATCH --array={array}"] if array else []
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(r, key)
        lines += [f"#SBATCH --{key}={value}"] if value else []
    return lines + [f"#SBATCH {line}" for line in r.extra]


# Threads per process: the CPUs SLURM gave each task (PyTorch would otherwise use every core of the node).
OMP_LINE = "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"


def distributed_args(nodes: int, devices_per_node: int) -> list[str]:
    return [
        f"--trainer.num_nodes={nodes}",
        f"--trainer.devices={devices_per_node}",
        "--prepare_data_per_node=false",  # one preparation per shared filesystem, by global rank 0
    ]


def fit_command(python: str, fit_args: list[str], nodes: int, devices_per_node: int) -> list[str]:
    fit = [python, "-m", "cope_pl.cli", "fit", *fit_args, *distributed_args(nodes, devices_per_node)]
    return fit + ["--ckpt_path=last"]


def slurm_script(
    fit_args: list[str], resources: Resources, job_name: str = "cope-pl", output: str = "%x-%j.out", python=None
) -> str:
    header = sbatch_header(job_name, resources, output)
    fit = fit_command(python or sys.executable, fit_args, resources.nodes, resources.tasks_per_node)
    body = ["set -euo pipefail", OMP_LINE, "srun " + shlex.join(fit)]
    return "\n".join(header + [""] + body) + "\n"


def torchrun_command(
    fit_args: list[str], nodes: int, gpus_per_node: int, rdzv_endpoint: str, python: str = sys.executable
) -> str:
    """The command to run on every node (same on all of them; rendezvous at rdzv_endpoint)."""
    launcher = [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]
    launcher += [
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id=cope-pl-{nodes}x{gpus_per_node}",
    ]
    fit = fit_command(python, fit_args, nodes, gpus_per_node)[1:]  # torchrun runs `-m cope_pl.cli ...` itself
    return shlex.join(launcher + fit)


def submit(script: str, env: dict[str, str] | None = None) -> str:
    """sbatch the script (read from stdin); its 'Submitted batch job N' line."""
    try:
        done = subprocess.run(["sbatch"], input=script, capture_output=True, text=True, env=env)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            "sbatch is not on PATH; write the script with --out and submit it on the cluster"
        ) from err
    if done.returncode != 0:
        raise RuntimeError(f"sbatch refused the job: {done.stderr.strip()}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("launcher", choices=["slurm", "torchrun"])
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int, help="default: trainer.devices for a GPU trainer, else 0")
    parser.add_argument("--tasks-per-node", type=int, help="processes per node without GPUs (default trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int, help="default: 1 + data.init_args.num_workers")
    parser.add_argument("--mem", help="memory per node, e.g. 64G")
    parser.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 40G (instead of --mem)")
    parser.add_argument("--time", help="time limit (default 24:00:00)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--extra", action="append", help="another #SBATCH option, e.g. --extra=--exclusive")
    parser.add_argument("--job-name", default="cope-pl")
    parser.add_argument("--output", default="%x-%j.out", help="slurm: the job's log file (appended to)")
    parser.add_argument("--rdzv-endpoint", default="localhost:29500", help="torchrun: host:port of node 0")
    parser.add_argument("--out", help="slurm: write the script here (default: print it)")
    parser.add_argument("--submit", action="store_true", help="slurm: submit the script with sbatch")
    parser.epilog = "Everything after -- is passed to `cope-pl fit`."
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, fit_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    options = {key: getattr(args, key) for key in RESOURCE_KEYS}
    try:
        resources = resolve_resources(run_settings(*split_fit_args(fit_args)), options, "cope-pl launch")
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err).removeprefix("cope-pl launch: "))
    if args.launcher == "torchrun":
        print(torchrun_command(fit_args, resources.nodes, resources.tasks_per_node, args.rdzv_endpoint))
        return
    script = slurm_script(fit_args, resources, job_name=args.job_name, output=args.output)
    log_dir = Path(args.output).parent
    if "%" not in str(log_dir):  # SLURM fails a job whose log it cannot open, and writes no word of why
        log_dir.mkdir(parents=True, exist_ok=True)
    size = f"{resources.nodes} node(s) x {resources.tasks_per_node} process(es)"
    size += f", {resources.gpus_per_node} GPU(s) per node" if resources.gpus_per_node else ", no GPU"
    if args.out:
        Path(args.out).write_text(script)
        print(
            f"SLURM script for {size} written to {args.out}" + ("" if args.submit else f"; submit: sbatch {args.out}")
        )
    elif not args.submit:
        print(script, end="")
    if args.submit:
        try:
            print(submit(script))
        except (OSError, RuntimeError) as err:
            sys.exit(f"cope-pl launch: error: {err}")
