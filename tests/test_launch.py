"""Launch paths and SLURM job scripts, checked as generated (no cluster needed): `cope-pl launch slurm|torchrun`
and `cope-pl sweep --slurm`. tests/test_slurm.py runs them on a real scheduler."""

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cope_pl.cli import main
from cope_pl.launch import (
    Resources,
    resolve_resources,
    run_settings,
    slurm_script,
    split_fit_args,
    torchrun_command,
)
from cope_pl.launch import main as launch_main
from cope_pl.sweep import array_spec, cell_status, load_sweep
from cope_pl.sweep import slurm_script as sweep_script

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIT_ARGS = ["--config", str(CONFIGS / "trainer/smoke.yaml"), "--config", str(CONFIGS / "position/cope.yaml")]
GPU_ARGS = ["--config", str(CONFIGS / "trainer/gpu_ddp.yaml"), "--config", str(CONFIGS / "position/cope.yaml")]


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def launch(capsys, *argv: str) -> str:
    launch_main(list(argv))
    return capsys.readouterr().out


def test_slurm_script_runs_one_task_per_gpu_on_every_node():
    resources = Resources(nodes=4, gpus_per_node=8, tasks_per_node=8, partition="gpu")
    script = slurm_script(GPU_ARGS, resources, job_name="big")
    for line in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--requeue"]:
        assert line in directives(script)
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    args = shlex.split(srun)
    assert args[2:5] == ["-m", "cope_pl.cli", "fit"] and args[5:9] == GPU_ARGS
    assert {"--trainer.num_nodes=4", "--trainer.devices=8", "--prepare_data_per_node=false", "--ckpt_path=last"} <= set(
        args
    )


def test_a_gpu_trainer_asks_for_its_devices_as_gpus(capsys):
    script = launch(capsys, "slurm", "--nodes", "2", "--", *GPU_ARGS, "--trainer.devices=4")
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"} <= set(directives(script))
    # devices: -1 (every GPU) says no count: one GPU unless --gpus-per-node says more
    assert "--gpus-per-node=1" in directives(launch(capsys, "slurm", "--", *GPU_ARGS))
    with pytest.raises(SystemExit):
        launch_main(["slurm", "--gpus-per-node", "0", "--", *GPU_ARGS])
    assert "trainer.accelerator=gpu needs GPUs" in capsys.readouterr().err


def test_a_cpu_trainer_asks_for_no_gpu_and_cpus_from_its_data_workers(capsys):
    script = launch(capsys, "slurm", "--tasks-per-node", "2", "--", *FIT_ARGS, "--trainer.strategy=ddp")
    lines = directives(script)
    assert not [line for line in lines if "gpu" in line]
    assert "--ntasks-per-node=2" in lines and "--cpus-per-task=1" in lines  # 1 process, no loader worker
    assert "--trainer.devices=2" in shlex.split(script.splitlines()[-1])
    workers = launch(capsys, "slurm", "--", *FIT_ARGS, "--data.init_args.num_workers", "3")
    assert "--cpus-per-task=4" in directives(workers)
    assert "--gpus-per-node" not in launch(capsys, "slurm", "--gpus-per-node", "0", "--", *FIT_ARGS)
    with pytest.raises(SystemExit):
        launch_main(["slurm", "--gpus-per-node", "2", "--", *FIT_ARGS])
    assert "GPUs would sit idle" in capsys.readouterr().err


def test_memory_account_qos_constraint_and_extra_directives(capsys):
    script = launch(
        capsys,
        *["slurm", "--mem-per-gpu", "40G", "--account", "proj1", "--qos", "high", "--constraint", "a100"],
        *["--extra=--exclusive", "--extra=--mail-type=END", "--cpus-per-task", "6", "--time", "2:00:00"],
        *["--", *GPU_ARGS, "--trainer.devices=2"],
    )
    expected = {"--mem-per-gpu=40G", "--account=proj1", "--qos=high", "--constraint=a100", "--exclusive"}
    assert expected | {"--mail-type=END", "--cpus-per-task=6", "--time=2:00:00"} <= set(directives(script))
    assert "--mem=64G" in directives(launch(capsys, "slurm", "--mem", "64G", "--", *FIT_ARGS))
    with pytest.raises(SystemExit):
        launch_main(["slurm", "--mem", "1G", "--mem-per-gpu", "1G", "--", *GPU_ARGS])
    assert "not both" in capsys.readouterr().err


def test_the_job_requeues_appends_its_log_and_gives_each_process_its_cpus(capsys):
    script = launch(capsys, "slurm", "--cpus-per-task", "4", "--", *FIT_ARGS)
    lines = directives(script)
    assert {"--requeue", "--signal=SIGUSR1@90", "--open-mode=append", "--output=%x-%j.out"} <= set(lines)
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script.splitlines()


def test_submit_without_sbatch_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        launch_main(["slurm", "--submit", "--", *FIT_ARGS])
    assert "sbatch is not on PATH" in str(info.value.code)


def test_missing_config_file_is_named(capsys):
    with pytest.raises(SystemExit):
        launch_main(["slurm", "--", "--config", "configs/trainer/nope.yaml"])
    assert "--config configs/trainer/nope.yaml: no such file" in capsys.readouterr().err


def test_settings_follow_the_cli_order_later_files_and_overrides_win():
    configs, overrides = split_fit_args([*GPU_ARGS, "--config", str(CONFIGS / "trainer/cpu.yaml")])
    assert run_settings(configs, overrides).accelerator == "cpu"
    configs, overrides = split_fit_args([*FIT_ARGS, "--trainer.accelerator", "gpu", "--data.num_workers=2"])
    settings = run_settings(configs, overrides)
    assert settings.gpu and settings.num_workers == 2
    assert resolve_resources(settings, {}, "x").gpus_per_node == 1


def test_torchrun_command_matches_nodes_and_gpus():
    args = shlex.split(torchrun_command(FIT_ARGS, nodes=2, gpus_per_node=4, rdzv_endpoint="node0:29500"))
    assert args[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-endpoint=node0:29500"} <= set(args)
    assert args[args.index("-m", 3) : args.index("-m", 3) + 3] == ["-m", "cope_pl.cli", "fit"]
    assert "--trainer.num_nodes=2" in args and "--trainer.devices=4" in args


def test_generated_fit_arguments_parse(capsys):
    script = slurm_script(GPU_ARGS, Resources(nodes=2, gpus_per_node=4, tasks_per_node=4))
    srun = [line for line in script.splitlines() if line.startswith("srun ")]
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


# Sweep array jobs ---------------------------------------------------------------------------------------
def cpu_sweep(tmp_path, **slurm):
    spec = {
        "name": "arr",
        "save_dir": str(tmp_path / "runs"),
        "configs": [str(CONFIGS / "trainer/smoke.yaml")],
        "grid": {"seed": [0, 1, 2, 3, 4, 5]},
        "test": False,
        "slurm": {"time": "0:10:00", **slurm},
    }
    path = tmp_path / "arr.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_sweep(path)


def test_sweep_array_on_cpus_requeues_appends_logs_and_takes_its_settings(tmp_path):
    sweep = cpu_sweep(tmp_path, gpus_per_node=0, mem="8G", account="proj1", qos="low", constraint="intel")
    sweep.slurm["extra"] = ["--exclusive"]
    lines = directives(sweep_script(sweep, sweep.file))
    assert not [line for line in lines if "gpu" in line] and "--cpus-per-task=1" in lines
    expected = {"--requeue", "--signal=SIGUSR1@90", "--open-mode=append", "--mem=8G", "--account=proj1", "--qos=low"}
    assert expected | {"--constraint=intel", "--exclusive", "--array=0-5"} <= set(lines)
    assert f"--output={tmp_path}/runs/logs/arr-%A_%a.out" in lines


def test_sweep_resubmission_allocates_only_unfinished_cells(tmp_path):
    sweep = cpu_sweep(tmp_path, max_parallel=2)
    for cell in (sweep.cells[0], sweep.cells[2], sweep.cells[3]):
        sweep.run_dir(cell).mkdir(parents=True)
        (sweep.run_dir(cell) / "results.json").write_text(json.dumps({"metrics": {"val/loss": 1.0}}))
    script = sweep_script(sweep, sweep.file)
    assert "--array=1,4-5%2" in directives(script)
    assert "  1)  # seed1" in script and "  0)  # seed0" not in script
    assert array_spec([7, 0, 1, 2, 5]) == "0-2,5,7"


def test_bad_slurm_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown SLURM settings \['gpus'\]"):
        sweep_script(cpu_sweep(tmp_path, gpus=1), tmp_path / "arr.yaml")
    with pytest.raises(ValueError, match="GPUs would sit idle"):
        sweep_script(cpu_sweep(tmp_path, gpus_per_node=1), tmp_path / "arr.yaml")


def test_the_array_task_records_a_kill_at_the_time_limit(tmp_path):
    """The script's own SIGTERM handler: run the array task with stand-ins for srun and squeue, kill it
    during its fit step as SLURM does at the time limit, and read the status `--dry-run` reports."""
    sweep = cpu_sweep(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    started = tmp_path / "srun.pid"
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho $$ > {started}\nexec sleep 60\n")
    (bin_dir / "squeue").write_text("#!/bin/bash\necho TimeLimit\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(sweep_script(sweep, sweep.file))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "41", "SLURM_ARRAY_JOB_ID": "40"}
    env |= {"SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "1"}
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        for _ in range(1200):  # the `--step-done` check starts Python before the fit step
            if started.is_file() and started.read_text().strip():
                break
            assert job.poll() is None, "the array task ended before its fit step"
            time.sleep(0.1)
        job.terminate()
        assert job.wait(timeout=30) == 143
    finally:
        job.kill()
        if started.is_file():
            subprocess.run(["kill", started.read_text().strip()])
    status = tmp_path / "runs" / "status" / "seed1.json"
    recorded = json.loads(status.read_text())
    assert recorded["status"] == "timeout" and recorded["step"] == "fit" and recorded["slurm_job"] == "40_1"
    assert recorded["cell"] == "seed1"  # as `cope-pl sweep` records it
    assert cell_status(sweep, sweep.cells[1]).startswith("timeout (in fit, SLURM job 40_1, log ")
    assert recorded["log"] == f"{tmp_path}/runs/logs/arr-40_1.out"


def test_the_log_directory_exists_before_the_job_starts(tmp_path, capsys):
    """SLURM fails a job whose --output it cannot open, without a word: launch makes the directory."""
    output = tmp_path / "logs" / "deep" / "%x-%j.out"
    launch(capsys, "slurm", "--output", str(output), "--out", str(tmp_path / "job.sbatch"), "--", *FIT_ARGS)
    assert output.parent.is_dir()
    assert f"--output={output}" in directives((tmp_path / "job.sbatch").read_text())
