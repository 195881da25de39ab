"""`cope-pl launch slurm|torchrun`: launch scripts for one training run on N nodes x G GPUs.

Lightning reads the cluster from the environment (SLURM_* under srun, the torchrun variables under
torchrun), so a launch only has to start one process per GPU with matching `trainer.num_nodes` and
`trainer.devices`. Data is prepared once per shared filesystem (`--prepare_data_per_node=false`), and
`--ckpt_path last` makes a requeued or resubmitted job continue where it stopped.

    cope-pl launch slurm --nodes 2 --gpus-per-node 8 -- --config configs/trainer/gpu_ddp.yaml ...
    cope-pl launch torchrun --nodes 2 --gpus-per-node 8 --rdzv-endpoint host:29500 -- --config ...
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def sbatch_header(
    job_name: str,
    nodes: int,
    gpus_per_node: int,
    output: str,
    cpus_per_task: int = 8,
    time: str = "24:00:00",
    partition: str | None = None,
    array: str | None = None,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """#SBATCH lines for one task per GPU; shared by single runs and sweep array jobs."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={gpus_per_node}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        f"#SBATCH --output={output}",
        f"#SBATCH --chdir={Path.cwd()}",  # config paths are relative to the repository root
    ]
    lines += [f"#SBATCH --array={array}"] if array else []
    lines += [f"#SBATCH --partition={partition}"] if partition else []
    return lines + [f"#SBATCH {line}" for line in extra]


def distributed_args(nodes: int, gpus_per_node: int) -> list[str]:
    return [
        f"--trainer.num_nodes={nodes}",
        f"--trainer.devices={gpus_per_node}",
        "--prepare_data_per_node=false",  # one preparation per shared filesystem, by global rank 0
    ]


def fit_command(python: str, fit_args: list[str], nodes: int, gpus_per_node: int) -> list[str]:
    return [python, "-m", "cope_pl.cli", "fit", *fit_args, *distributed_args(nodes, gpus_per_node), "--ckpt_path=last"]


def slurm_script(fit_args: list[str], nodes: int, gpus_per_node: int, python: str = sys.executable, **sbatch) -> str:
    header = sbatch_header(nodes=nodes, gpus_per_node=gpus_per_node, **sbatch)
    # --requeue + SIGUSR1 before the time limit: Lightning saves and requeues; --ckpt_path last resumes.
    header += ["#SBATCH --requeue", "#SBATCH --signal=SIGUSR1@120"]
    body = ["set -euo pipefail", "srun " + shlex.join(fit_command(python, fit_args, nodes, gpus_per_node))]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cope-pl launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("launcher", choices=["slurm", "torchrun"])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--job-name", default="cope-pl")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="24:00:00")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--rdzv-endpoint", default="localhost:29500", help="torchrun: host:port of node 0")
    parser.add_argument("--out", help="slurm: write the script here (default: print it)")
    parser.epilog = "Everything after -- is passed to `cope-pl fit`."
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, fit_args = parser.parse_args(argv[:split]), argv[split + 1 :]
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be >= 1")
    if args.launcher == "torchrun":
        print(torchrun_command(fit_args, args.nodes, args.gpus_per_node, args.rdzv_endpoint))
        return
    script = slurm_script(
        fit_args,
        args.nodes,
        args.gpus_per_node,
        job_name=args.job_name,
        output="%x-%j.out",
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
    )
    if args.out:
        Path(args.out).write_text(script)
        size = f"{args.nodes} x {args.gpus_per_node} GPUs"
        print(f"SLURM script for {size} written to {args.out}; submit it with: sbatch {args.out}")
    else:
        print(script, end="")
