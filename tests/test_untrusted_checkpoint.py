"""A checkpoint never runs code: every command that reads one refuses a crafted file in one line.

The crafted file is a real torch.save archive whose pickle calls os.system (it would create a marker file);
each command must refuse it before anything of it is called, and the marker must never appear.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cope_pl.cli import main
from cope_pl.resume import CheckedCheckpointIO, UntrustedCheckpointError, is_intact, read_checkpoint
from tests.test_sweep import CONFIGS, ROOT

TINY = [
    *("--config", str(CONFIGS / "trainer/smoke.yaml")),
    *("--config", str(CONFIGS / "data/copy.yaml")),
    *("--config", str(CONFIGS / "model/tiny.yaml")),
    "--data.init_args.seq_len=16",
    "--data.init_args.train_size=32",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=0",
]
DATA = {
    "copy": ("cope_pl.data.CopyDataModule", {"seq_len": 16, "train_size": 32, "eval_size": 32}),
    "passkey": ("cope_pl.data.PasskeyDataModule", {"seq_len": 64, "train_size": 32, "eval_size": 8}),
    "counting": ("cope_pl.data.CountingDataModule", {"train_size": 32, "eval_size": 8}),
}


class RunsShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped archive whose hyper-parameters, when unpickled freely, run `touch marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {}, "global_step": 1, "hyper_parameters": {"d_model": RunsShellCommand(f"touch {marker}")}}
    torch.save(payload, path)
    return path


def crafted_run(tmp_path: Path, data: str = "copy") -> tuple[Path, Path, Path]:
    """(run directory with a config.yaml and a crafted last.ckpt, the checkpoint, the marker it would create)."""
    class_path, init_args = DATA[data]
    run = tmp_path / "runs" / f"{data}-rope" / "version_0"
    run.mkdir(parents=True)
    config = {"data": {"class_path": class_path, "init_args": init_args}, "model": {"position": "rope"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    marker = tmp_path / "marker"
    return run, crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker), marker


def assert_refused(err: BaseException, ckpt: Path, marker: Path) -> None:
    message = str(err)
    assert isinstance(err, UntrustedCheckpointError), message
    assert message.startswith(f"checkpoint {ckpt} holds posix.system") or "holds nt.system" in message
    assert "not trusted" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "command, data",
    [
        (["generate", "{ckpt}", "--prompt", "hi"], "copy"),
        (["eval-context", "{ckpt}", "--lengths", "1x"], "copy"),
        (["position-maps", "{run}", "--out", "{tmp}/maps"], "copy"),
        (["passkey", "{run}", "--lengths", "1x"], "passkey"),
        (["count-probe", "{run}"], "counting"),
        (["test", "--config", "{run}/config.yaml", *TINY[6:], "--ckpt_path={ckpt}"], "copy"),
        (["fit", *TINY, "--trainer.logger.init_args.save_dir={tmp}/other", "--ckpt_path={ckpt}"], "copy"),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else v,
)
def test_every_command_refuses_a_crafted_checkpoint_without_running_it(tmp_path, command, data):
    run, ckpt, marker = crafted_run(tmp_path, data)
    argv = [a.format(ckpt=ckpt, run=run, tmp=tmp_path) for a in command]
    with pytest.raises(ValueError) as err:
        main(argv)
    assert_refused(err.value, ckpt, marker)
    assert ckpt.is_file()  # refused, not set aside as corrupt


def test_test_in_place_refuses_it(tmp_path):
    run, ckpt, marker = crafted_run(tmp_path)
    (run / "results.json").write_text(json.dumps({"fit_finished": True, "metrics": {}}))
    with pytest.raises(ValueError) as err:
        main(["test", str(run), *TINY[6:]])
    assert_refused(err.value, ckpt, marker)


def test_resuming_refuses_it_through_the_checkpoint_io(tmp_path):
    """`fit --ckpt_path last` (a sweep's resume) reads last.ckpt through CheckedCheckpointIO, not the CLI."""
    marker = tmp_path / "marker"
    ckpt = crafted_checkpoint(tmp_path / "copy-rope" / "version_0" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(ValueError) as err:
        main(["fit", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}", "--ckpt_path=last"])
    assert_refused(err.value, ckpt, marker)
    with pytest.raises(ValueError) as err:  # whatever the caller asks for
        CheckedCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    assert_refused(err.value, ckpt, marker)


def test_a_sweep_resume_fails_in_one_line_and_runs_nothing(tmp_path):
    from cope_pl.sweep import load_sweep, step_command

    spec = {"name": "s", "save_dir": str(tmp_path / "runs"), "configs": TINY[1::2][:3], "grid": {"seed": [0]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    sweep = load_sweep(tmp_path / "s.yaml")
    cell = sweep.cells[0]
    marker = tmp_path / "marker"
    ckpt = crafted_checkpoint(sweep.run_dir(cell) / "checkpoints" / "last.ckpt", marker)
    cmd = [*step_command(sweep, cell, "fit"), *TINY[6:]]
    cmd[0:3] = [sys.executable, "-m", "cope_pl.cli"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and not marker.exists()
    assert done.stderr.strip().splitlines()[-1].startswith(f"cope-pl: error: checkpoint {ckpt} holds posix.system")
    assert "Traceback" not in done.stderr and "Weights only load failed" not in done.stderr


def test_the_console_command_prints_one_line(tmp_path):
    run, ckpt, marker = crafted_run(tmp_path)
    cli = [sys.executable, "-m", "cope_pl.cli", "generate", str(ckpt), "--prompt", "hi"]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and not marker.exists()
    assert done.stderr.strip().splitlines() == [
        f"cope-pl: error: checkpoint {ckpt} holds posix.system, which no cope_pl checkpoint holds; the file is not "
        "trusted and was not loaded (use checkpoints written by cope-pl fit)"
    ]


def test_the_recovery_hint_never_names_a_crafted_checkpoint(tmp_path):
    """A corrupt last.ckpt beside a crafted one: the integrity check reads the archive and the pickle's opcodes
    only, so nothing runs, and the crafted file is not offered as the one to resume from."""
    marker = tmp_path / "marker"
    checkpoints = tmp_path / "copy-rope" / "version_0" / "checkpoints"
    crafted = crafted_checkpoint(checkpoints / "epoch=0-step=1.ckpt", marker)
    (checkpoints / "last.ckpt").write_bytes(crafted.read_bytes()[:500])
    assert not is_intact(crafted) and not marker.exists()
    # --ckpt_path last sets the corrupt last.ckpt aside and refuses the crafted one behind it, naming it.
    with pytest.raises(ValueError, match="holds posix.system, which no cope_pl checkpoint holds; the file is not"):
        main(["fit", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}", "--ckpt_path=last"])
    with pytest.raises(ValueError, match="no intact checkpoint is left"):
        main(["generate", str(checkpoints / "last.ckpt.corrupt"), "--prompt", "hi"])
    assert not marker.exists()


def test_a_checkpoint_of_fit_loads_under_the_allowlist(tmp_path):
    """What `cope-pl fit` writes (hyper-parameters, loops, callbacks, optimizer, scheduler, RNG state) names
    nothing outside the allowlist, and reads back."""
    main(["fit", *TINY, f"--trainer.logger.init_args.save_dir={tmp_path}", "--model.dropout=0.1"])
    last = tmp_path / "copy-rope" / "version_0" / "checkpoints" / "last.ckpt"
    assert is_intact(last)
    checkpoint = read_checkpoint(last)
    assert checkpoint["global_step"] == 2 and "RngState" in checkpoint["callbacks"]
    assert checkpoint["optimizer_states"][0]["state"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_allowlist_refuses_before_unpickling_whatever_the_pickle_protocol(tmp_path, protocol):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "x.ckpt"
    torch.save({"hyper_parameters": RunsShellCommand(f"touch {marker}")}, ckpt, pickle_protocol=protocol)
    with pytest.raises(UntrustedCheckpointError, match="not trusted") as err:
        read_checkpoint(ckpt)
    assert ("posix.system" in str(err.value)) == (protocol == 2) and not marker.exists()


def test_every_pickle_in_the_archive_is_checked(tmp_path):
    """A second pickle hidden beside a harmless one is found too, and is never unpickled."""
    import zipfile

    marker = tmp_path / "marker"
    harmless, crafted = tmp_path / "harmless.ckpt", crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    torch.save({"global_step": 1}, harmless)
    with zipfile.ZipFile(crafted) as source, zipfile.ZipFile(harmless, "a") as target:
        evil = next(n for n in source.namelist() if n.endswith("data.pkl"))
        target.writestr("hidden/data.pkl", source.read(evil))
    assert not is_intact(harmless)
    with pytest.raises(UntrustedCheckpointError, match="holds posix.system"):
        read_checkpoint(harmless)
    assert not marker.exists()
