"""A run killed with SIGKILL, or preempted after a SIGUSR1 warning, and resumed with `--ckpt_path last`
continues exactly as if never stopped; a run stopped by SIGTERM exits non-zero.

Each test starts `cope-pl fit` in a subprocess (a real kill, a real restart), reads the per-step losses
from the TensorBoard event files and compares them step by step with an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cope_pl.resume import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# 64 training items in batches of 16: an epoch is 4 steps, so 12 steps cross two epoch boundaries.
# Dropout is on, so the RNG state matters too.
BASE = [
    *("--config", str(CONFIGS / "trainer/smoke.yaml")),
    *("--config", str(CONFIGS / "data/copy.yaml")),
    *("--config", str(CONFIGS / "model/tiny.yaml")),
    "--data.init_args.seq_len=16",
    "--data.init_args.batch_size=16",
    "--data.init_args.train_size=64",
    "--model.dropout=0.1",
    "--model.warmup_steps=3",
    "--trainer.max_steps=12",
    "--trainer.limit_val_batches=0",
    "--checkpoint.every_n_train_steps=4",
]


def fit(
    save_dir: Path, *extra: str, callback: str | None = None, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "cope_pl.cli", "fit", *BASE, f"--trainer.logger.init_args.save_dir={save_dir}"]
    if callback:
        args.append("--trainer.callbacks+=" + callback)
    done = subprocess.run([*args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"cope-pl fit failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step over every event file of a run; a later file (the resumed process) wins."""
    values: dict[int, float] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return values


def kill_at(step: int) -> str:
    return json.dumps({"class_path": "tests.fault_injection.KillAtStep", "init_args": {"step": step}})


def signal_at(step: int, name: str, sender: str = "SignalAtStep") -> str:
    return json.dumps({"class_path": f"tests.fault_injection.{sender}", "init_args": {"step": step, "name": name}})


def slurm_job(tmp_path: Path) -> dict:
    """The environment of a one-task SLURM job 4242, with an `scontrol` on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="preemption-test",
        SLURM_NTASKS="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
    )
    return env


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    runs = tmp_path_factory.mktemp("uninterrupted")
    fit(runs)
    return losses(runs / "copy-rope" / "version_0")


@pytest.mark.parametrize("kill_step", [6, 9], ids=["resume-at-epoch-end", "resume-mid-epoch"])
def test_sigkilled_run_resumes_on_the_same_loss_trajectory(tmp_path, uninterrupted, kill_step):
    killed = fit(tmp_path, callback=kill_at(kill_step), check=False)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "copy-rope" / "version_0"
    assert max(losses(run)) < 11  # it really stopped early

    fit(tmp_path, "--ckpt_path=last")
    assert not (tmp_path / "copy-rope" / "version_1").exists()  # resumed in place, not a new run
    resumed = losses(run)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))  # logged at the step each update completes
    for step, loss in uninterrupted.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


def test_preemption_warning_checkpoints_into_the_run_and_the_requeued_job_resumes_from_it(tmp_path, uninterrupted):
    # SIGUSR1 after step 5 (SLURM's warning before the time limit), then the job is killed after step 7; the
    # periodic checkpoints are at steps 4 and 8, so only the preemption checkpoint holds step 5.
    env = slurm_job(tmp_path)
    hpc_in_root = set(ROOT.glob("hpc_ckpt_*.ckpt"))
    callbacks = f"[{signal_at(5, 'SIGUSR1')}, {kill_at(7)}]"
    killed = fit(tmp_path, callback=callbacks, check=False, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    preempted = checkpoints / "hpc_ckpt_1.ckpt"
    assert read_checkpoint(preempted)["global_step"] == 5  # at the end of the step under way
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 4
    assert set(ROOT.glob("hpc_ckpt_*.ckpt")) == hpc_in_root  # nothing written into the working directory
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    resumed = fit(tmp_path, "--ckpt_path=last", env=env)
    assert f"Restored all states from the checkpoint at {preempted}" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "copy-rope" / "version_1").exists()
    run_losses = losses(tmp_path / "copy-rope" / "version_0")
    assert sorted(run_losses) == list(range(1, 13))  # logged at the step each update completes
    for step, loss in uninterrupted.items():
        assert run_losses[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


def test_test_command_in_a_slurm_job_goes_on_after_the_time_limit_warning(tmp_path):
    """`cope-pl test RUN_DIR` as a step of a SLURM job: the warning before the time limit neither ends it nor lets
    Lightning's own handler write a checkpoint into the working directory and requeue the job."""
    fit(tmp_path, "--trainer.max_steps=4")
    run = tmp_path / "copy-rope" / "version_0"
    env = slurm_job(tmp_path)
    hpc_in_root = set(ROOT.glob("hpc_ckpt_*.ckpt"))
    callback = json.dumps({"class_path": "tests.fault_injection.SignalAtTestBatch", "init_args": {"name": "SIGUSR1"}})
    done = subprocess.run(
        [sys.executable, "-m", "cope_pl.cli", "test", str(run), "--trainer.callbacks+=" + callback],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test/loss" in json.loads((run / "results.json").read_text())["metrics"]
    assert not (tmp_path / "scontrol.log").exists()  # not requeued
    assert set(ROOT.glob("hpc_ckpt_*.ckpt")) == hpc_in_root and not list(tmp_path.rglob("hpc_ckpt_*"))


def test_a_second_preemption_checkpoint_replaces_the_first(tmp_path):
    """Each warning writes hpc_ckpt_N.ckpt; the earlier ones are deleted once it is written, so a job preempted
    many times keeps one full checkpoint of them, not one per preemption."""
    fit(tmp_path, "--trainer.max_steps=8", callback=f"[{signal_at(3, 'SIGUSR1')}, {signal_at(6, 'SIGUSR1')}]")
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_2.ckpt"]
    assert read_checkpoint(checkpoints / "hpc_ckpt_2.ckpt")["global_step"] == 6


# SIGTERM before the preemption callback looks at the step, or after it (then the trainer's stop saves).
@pytest.mark.parametrize("sender", ["SignalAtStep", "SignalAfterCallbacks"])
def test_fit_stopped_by_sigterm_checkpoints_its_step_and_exits_non_zero(tmp_path, sender):
    stopped = fit(tmp_path, callback=signal_at(5, "SIGTERM", sender), check=False)
    assert stopped.returncode == 128 + signal.SIGTERM
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    assert read_checkpoint(checkpoints / "hpc_ckpt_1.ckpt")["global_step"] == 5
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert last_line == "cope-pl: stopped by SIGTERM; continue the run with --ckpt_path last"
    results = tmp_path / "copy-rope" / "version_0" / "results.json"
    assert not results.exists() or "fit_finished" not in json.loads(results.read_text())


def test_kill_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, uninterrupted):
    during_save = json.dumps({"class_path": "tests.fault_injection.KillDuringSave", "init_args": {"step": 5}})
    killed = fit(tmp_path, callback=during_save, check=False)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 4
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]

    fit(tmp_path, "--ckpt_path=last")
    assert losses(tmp_path / "copy-rope" / "version_0")[11] == pytest.approx(uninterrupted[11], abs=1e-5)


def test_truncated_checkpoint_is_refused_in_one_line(tmp_path):
    fit(tmp_path, "--trainer.max_steps=4")
    last = tmp_path / "copy-rope" / "version_0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    done = subprocess.run(  # a checkpoint named on the command line is used or refused, never swapped
        [sys.executable, "-m", "cope_pl.cli", "fit", *BASE, f"--trainer.logger.init_args.save_dir={tmp_path}"]
        + [f"--ckpt_path={last}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(
        f"cope-pl: error: checkpoint {last} is corrupt or truncated (kept as last.ckpt.corrupt)"
    )
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr


def test_corrupt_checkpoint_advice_names_the_intact_one_and_following_it_resumes(tmp_path):
    fit(tmp_path, "--trainer.max_steps=8", "--checkpoint.save_top_k=-1")  # steps 4 and 8, last.ckpt at 8
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    (checkpoints / "epoch=1-step=8.ckpt").write_bytes(b"not a checkpoint")  # corrupt too: skipped
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    done = fit(tmp_path, f"--ckpt_path={last}", "--trainer.max_steps=12", check=False)
    advice = done.stderr.strip().splitlines()[-1]
    intact = checkpoints / "epoch=0-step=4.ckpt"
    assert f"the newest intact checkpoint beside it is {intact.name}" in advice
    command = advice.split("resume from it with: ", 1)[1]
    assert command.endswith(f"--ckpt_path {intact}")

    resumed = fit(tmp_path, f"--ckpt_path={intact}", "--trainer.max_steps=12")
    assert "Restored all states" in resumed.stdout + resumed.stderr  # not a silent restart from scratch
    assert read_checkpoint(last)["global_step"] == 12
    assert (checkpoints / "last.ckpt.corrupt").stat().st_size == 1000  # kept, out of the way


def test_resume_last_sets_corrupt_checkpoints_aside_and_takes_the_newest_intact_one(tmp_path):
    fit(tmp_path, "--trainer.max_steps=8", "--checkpoint.save_top_k=-1")  # steps 4 and 8, last.ckpt at 8
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    (checkpoints / "epoch=1-step=8.ckpt").write_bytes(b"not a checkpoint")
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    resumed = fit(tmp_path, "--ckpt_path=last", "--trainer.max_steps=12")
    intact = checkpoints / "epoch=0-step=4.ckpt"
    assert f"{last} is corrupt or truncated (kept as last.ckpt.corrupt)" in resumed.stdout
    assert f"Restored all states from the checkpoint at {intact}" in resumed.stdout + resumed.stderr
    assert (checkpoints / "epoch=1-step=8.ckpt.corrupt").is_file()
    assert read_checkpoint(last)["global_step"] == 12


def test_resume_last_without_last_ckpt_continues_from_the_newest_checkpoint(tmp_path):
    fit(tmp_path, "--trainer.max_steps=8")
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    (checkpoints / "last.ckpt").unlink()
    resumed = fit(tmp_path, "--ckpt_path=last", "--trainer.max_steps=12")
    assert "resuming from" in resumed.stdout and "starting from scratch" not in resumed.stdout
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 12
