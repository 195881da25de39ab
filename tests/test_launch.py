"""Multi-node launch paths, checked as generated (no cluster needed): SLURM sbatch and torchrun."""

import shlex
from pathlib import Path

import pytest

from cope_pl.cli import main
from cope_pl.launch import slurm_script, torchrun_command

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIT_ARGS = ["--config", str(CONFIGS / "trainer/smoke.yaml"), "--config", str(CONFIGS / "position/cope.yaml")]


def test_slurm_script_runs_one_task_per_gpu_on_every_node():
    script = slurm_script(FIT_ARGS, nodes=4, gpus_per_node=8, job_name="big", output="%x-%j.out", partition="gpu")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"]:
        assert line in script.splitlines()
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --requeue" in script
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    args = shlex.split(srun)
    assert args[2:5] == ["-m", "cope_pl.cli", "fit"] and args[5:9] == FIT_ARGS
    assert {"--trainer.num_nodes=4", "--trainer.devices=8", "--prepare_data_per_node=false", "--ckpt_path=last"} <= set(
        args
    )


def test_torchrun_command_matches_nodes_and_gpus():
    args = shlex.split(torchrun_command(FIT_ARGS, nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29500"))
    assert args[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-endpoint=node0:29500"} <= set(args)
    assert args[args.index("-m", 3) : args.index("-m", 3) + 3] == ["-m", "cope_pl.cli", "fit"]
    assert "--trainer.num_nodes=2" in args and "--trainer.devices=4" in args


def test_generated_fit_arguments_parse(capsys):
    srun = [line for line in slurm_script(FIT_ARGS, 2, 4, job_name="j", output="o").splitlines() if "srun" in line]
    fit_args = shlex.split(srun[0])[5:]
    with pytest.raises(SystemExit) as info:
        main(["fit", *fit_args, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "num_nodes: 2" in printed and "prepare_data_per_node: false" in printed


def test_prepare_data_once_per_filesystem_reaches_the_data_module(tmp_path):
    cli = main(
        ["fit", *FIT_ARGS, "--prepare_data_per_node=false", "--trainer.max_steps=1"]
        + [f"--trainer.logger.init_args.save_dir={tmp_path}"]
    )
    assert cli.datamodule.prepare_data_per_node is False
