"""The SLURM paths on a real scheduler: a one-node cluster (munged, slurmctld, slurmd) brought up on this
machine for the session (tests/slurm_cluster.py), with CPU processes standing in for GPUs (gloo).

- a 2-cell sweep array runs to completion, and a re-submission allocates only the cell left unfinished;
- `cope-pl launch slurm` runs a 2-process DDP job to its results;
- `scancel --signal=USR1` (what SLURM sends before a time limit or a preemption) makes the job save, requeue
  itself and resume from the preemption checkpoint.

Skips in one line where the cluster cannot be started here (no slurm-wlm/munge, not root); with
COPE_PL_SLURM_TIER=required (set by .ci/run once it installed them) that is a failure instead.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.slurm_cluster import missing_requirement, start_cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
COPE_PL = [sys.executable, "-m", "cope_pl.cli"]
MODEL = [f"{CONFIGS}/{name}.yaml" for name in ("trainer/smoke", "data/copy", "model/tiny", "position/cope")]
JOB_TIMEOUT = 600  # seconds; a busy machine starts each Python with torch in seconds


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = missing_requirement()
    if reason:
        if os.environ.get("COPE_PL_SLURM_TIER") == "required":
            pytest.fail(reason.replace("skipped", "required but cannot run"))
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def submitted(cluster, cmd: list[str], cwd: Path) -> str:
    """Run a `cope-pl ... --submit` command; the job id sbatch gave."""
    done = subprocess.run(cmd, cwd=cwd, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (job,) = re.findall(r"Submitted batch job (\d+)", done.stdout)
    return job


def job_record(cluster, job: str) -> str:
    """`scontrol show job` of a job (every task of an array); finished jobs stay listed (MinJobAge)."""
    return cluster.run("scontrol", "show", "job", job, check=False).stdout


def queued(cluster, job: str) -> bool:
    return bool(cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip())


def failure_details(cluster, job: str, logs: Path) -> str:
    record = job_record(cluster, job)
    return record + "\n".join(f"--- {p}\n{p.read_text()[-4000:]}" for p in sorted(logs.rglob("*.out")))


def wait_for(cluster, ready, what: str, job: str, logs: Path, timeout: float = JOB_TIMEOUT) -> None:
    """Wait until ready(); fail at once when the job has left the queue without it."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not queued(cluster, job) and not ready():
            pytest.fail(f"job {job} ended before its {what}:\n{failure_details(cluster, job, logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s:\n{failure_details(cluster, job, logs)}")
        time.sleep(1)


def wait_finished(cluster, job: str, logs: Path) -> list[str]:
    """Wait until no task of the job is queued or running; the JobState of every task."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while queued(cluster, job):
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} still queued after {JOB_TIMEOUT} s:\n{failure_details(cluster, job, logs)}")
        time.sleep(1)
    return re.findall(r"JobState=(\w+)", job_record(cluster, job))


def test_sweep_array_runs_every_cell_and_a_resubmission_only_the_unfinished(cluster, tmp_path):
    spec = {
        "name": "slurm_tier",
        "save_dir": str(tmp_path / "runs"),
        "configs": MODEL[:3],
        "overrides": {"trainer.max_steps": 2, "trainer.val_check_interval": 2},
        "grid": {"position": [f"{CONFIGS}/position/cope.yaml", f"{CONFIGS}/position/rope.yaml"]},
        "test": True,
        "slurm": {"gpus_per_node": 0, "time": "0:15:00"},
    }
    sweep_file = tmp_path / "slurm_tier.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    sweep = [*COPE_PL, "sweep", str(sweep_file)]
    runs = tmp_path / "runs"

    job = submitted(cluster, [*sweep, "--slurm", "--submit"], cwd=tmp_path)
    assert wait_finished(cluster, job, runs) == ["COMPLETED", "COMPLETED"], failure_details(cluster, job, runs)
    for index, cell in enumerate(["cope", "rope"]):
        results = json.loads((runs / cell / "version_0" / "results.json").read_text())
        assert any(key.startswith("test/") for key in results["metrics"]), cell
        status = json.loads((runs / "status" / f"{cell}.json").read_text())
        assert status["status"] == "done" and status["slurm_job"] == f"{job}_{index}"
        assert Path(status["log"]).is_file() and "fit" in Path(status["log"]).read_text()
    dry_run = subprocess.run([*sweep, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, env=cluster.env)
    assert "[0] cope: done" in dry_run.stdout and "[1] rope: done" in dry_run.stdout

    # The rope cell lost: a re-submission allocates its array index only, and leaves the finished cell alone.
    finished = (runs / "cope" / "version_0" / "results.json").stat().st_mtime_ns
    (runs / "rope" / "version_0" / "results.json").unlink()
    again = submitted(cluster, [*sweep, "--slurm", "--submit"], cwd=tmp_path)
    assert "#SBATCH --array=1" in (runs / "slurm_tier.sbatch").read_text().splitlines()
    assert wait_finished(cluster, again, runs) == ["COMPLETED"], failure_details(cluster, again, runs)
    assert re.search(rf"JobId={again} ArrayJobId={again} ArrayTaskId=1\b", job_record(cluster, again))
    assert (runs / "rope" / "version_0" / "results.json").is_file()
    assert (runs / "cope" / "version_0" / "results.json").stat().st_mtime_ns == finished
    assert json.loads((runs / "status" / "rope.json").read_text())["slurm_job"] == f"{again}_1"
    first_log = (runs / "logs" / f"slurm_tier-{job}_1.out").read_text()
    assert "fit" in first_log  # the first attempt's log is kept beside the second's
    nothing = subprocess.run([*sweep, "--slurm", "--submit"], cwd=tmp_path, capture_output=True, text=True)
    assert nothing.returncode == 0 and "nothing to submit" in nothing.stdout


def launch_cmd(tmp_path: Path, name: str, *options: str, fit: tuple[str, ...] = ()) -> list[str]:
    fit_args = [arg for config in MODEL for arg in ("--config", config)]
    fit_args += [f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--trainer.logger.init_args.name={name}"]
    output = str(tmp_path / "runs" / f"{name}-%j.out")
    launch = [*COPE_PL, "launch", "slurm", "--job-name", name, "--time", "0:15:00", "--output", output, "--submit"]
    return [*launch, *options, "--", *fit_args, *fit]


def test_launch_slurm_trains_two_processes_to_their_results(cluster, tmp_path):
    cmd = launch_cmd(tmp_path, "ddp2", "--tasks-per-node", "2", fit=("--trainer.strategy=ddp",))
    job = submitted(cluster, cmd, cwd=tmp_path)
    runs = tmp_path / "runs"
    assert wait_finished(cluster, job, runs) == ["COMPLETED"], failure_details(cluster, job, runs)
    log = (runs / f"ddp2-{job}.out").read_text()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log  # two ranks, from SLURM's environment
    results = json.loads((runs / "ddp2" / "version_0" / "results.json").read_text())
    assert results["metrics"]["val/loss"] > 0


def test_a_preempted_job_requeues_and_resumes_from_its_preemption_checkpoint(cluster, tmp_path):
    """USR1 as SLURM sends it before a time limit or preemption (`#SBATCH --signal=SIGUSR1@90`), sent once the
    first periodic checkpoint exists: the job saves, requeues itself and the second attempt trains on from the
    preemption checkpoint, not from the older periodic one, to the end."""
    steps = ("--trainer.max_steps=200", "--trainer.val_check_interval=200", "--checkpoint.every_n_train_steps=10")
    job = submitted(cluster, launch_cmd(tmp_path, "preempt", fit=steps), cwd=tmp_path)
    runs = tmp_path / "runs"
    run = runs / "preempt" / "version_0"
    wait_for(cluster, lambda: any(run.glob("checkpoints/*.ckpt")), "first checkpoint", job, runs)
    cluster.run("scancel", "--signal=USR1", job)
    wait_for(cluster, lambda: "Restarts=1" in job_record(cluster, job), "requeue", job, runs)
    assert wait_finished(cluster, job, runs) == ["COMPLETED"], failure_details(cluster, job, runs)

    log = (runs / f"preempt-{job}.out").read_text()  # both attempts: the log is appended to
    restored = re.findall(r"Restoring states from the checkpoint path at (\S+)", log)
    assert len(restored) == 1, failure_details(cluster, job, runs)
    checkpoint = Path(restored[0])
    stray = [p for p in tmp_path.rglob("hpc_ckpt*") if p.parent != run / "checkpoints"]
    assert not stray, f"preemption checkpoints outside the run: {stray}"
    # Written at the warning, before the requeue (and deleted once a later one, SIGTERM's, is written).
    warned = re.search(r"preemption warning: saved (\S+) at step (\d+)", log)
    assert warned and Path(warned[1]) == run / "checkpoints" / "hpc_ckpt_1.ckpt", failure_details(cluster, job, runs)
    assert checkpoint.parent == run / "checkpoints", failure_details(cluster, job, runs)
    assert len(list(run.glob("checkpoints/hpc_ckpt_*.ckpt"))) == 1  # only the newest preemption checkpoint is kept
    warned_at = int(warned[2])
    # The newest state: the warning's checkpoint, or one the first attempt wrote after it before SLURM stopped it
    # (SIGTERM's, or a periodic one on a slow machine): the second attempt logs its first loss one step after it.
    second_attempt = max(run.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    events = EventAccumulator(str(second_attempt))
    events.Reload()
    resumed_at = min(e.step for e in events.Scalars("train/loss")) - 1  # the smoke trainer logs every step
    assert 10 < warned_at <= resumed_at < 200, failure_details(cluster, job, runs)
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["val/loss"] > 0
