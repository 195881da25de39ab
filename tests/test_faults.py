"""Faults and bad input during training: each gives one clear line naming the problem and the fix."""

import errno
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from cope_pl.cli import main
from cope_pl.data import CopyDataModule
from cope_pl.lm import LanguageModel
from cope_pl.numerics import NonFiniteError, NonFiniteGuard
from cope_pl.resume import CheckedCheckpointIO, read_checkpoint
from tests.fault_injection import NaNAtStep

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def tiny_lm(**kwargs) -> LanguageModel:
    defaults = dict(vocab_size=9, n_layers=1, d_model=16, n_heads=2, max_seq_len=16, position="rope", lr=1e-2)
    return LanguageModel(**{**defaults, **kwargs})


def trainer(tmp_path, steps: int, callbacks=(), **kwargs) -> L.Trainer:
    kwargs = {"limit_val_batches": 0, **kwargs}
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        plugins=[CheckedCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2), *callbacks],
        **kwargs,
    )


def data() -> CopyDataModule:
    return CopyDataModule(seq_len=16, batch_size=4, num_symbols=8, train_size=64, eval_size=8)


def test_nan_stops_the_run_naming_step_checkpoint_and_causes(tmp_path):
    model = tiny_lm()
    with pytest.raises(NonFiniteError) as info:
        trainer(tmp_path, 8, [NaNAtStep(5), NonFiniteGuard()]).fit(model, data())
    message = str(info.value)
    assert message.startswith("non-finite gradient (first in model.")
    assert "at step 5" in message and "last.ckpt" in message and "model.lr=0.01" in message
    last = read_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["global_step"] == 4  # the last good one; nothing was saved after the NaN
    assert all(t.isfinite().all() for t in last["state_dict"].values())


def test_fp16_advice_is_given_under_fp16(tmp_path):
    guard = NonFiniteGuard()

    class Fake:
        precision = "16-mixed"
        global_step = 3
        checkpoint_callback = None

    with pytest.raises(NonFiniteError, match="use trainer.precision=bf16-mixed"):
        guard._fail(Fake(), tiny_lm(), "loss (nan)")


def test_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    trainer(tmp_path, 2).fit(tiny_lm(), data())
    other = tiny_lm(d_model=32, vocab_size=20)
    with pytest.raises(
        ValueError, match=r"different model: vocab_size=9 \(this run: 20\), d_model=16 \(this run: 32\)"
    ):
        trainer(tmp_path / "b", 4).fit(other, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")


def test_changing_only_the_cope_implementation_may_resume(tmp_path):
    trainer(tmp_path, 2).fit(tiny_lm(position="cope", position_options={"impl": "reference"}), data())
    resumed = tiny_lm(position="cope", position_options={"impl": "chunked"})
    trainer(tmp_path / "b", 4).fit(resumed, data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == 4


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = CheckedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def no_space(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.ckpt \(No space left on device\); free some"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial temporary file is gone


def test_unwritable_log_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the log directory should go")
    with pytest.raises(
        OSError, match="cannot write the log directory .*not_a_dir.*; set trainer.logger.init_args.save_dir"
    ):
        main(["fit", "--config", str(CONFIGS / "trainer/smoke.yaml"), f"--trainer.logger.init_args.save_dir={blocker}"])


def test_a_gpu_config_on_a_machine_without_a_gpu_names_the_cpu_config(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    configs = [
        a for c in ("trainer/gpu_ddp.yaml", "data/copy.yaml", "model/tiny.yaml") for a in ("--config", CONFIGS / c)
    ]
    with pytest.raises(ValueError, match=r"accelerator=gpu, but torch .* sees no GPU .* configs/trainer/cpu.yaml"):
        main(["fit", *map(str, configs), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())  # refused before a run folder is made


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cope_pl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.d_modle=3"], "error: unrecognized arguments: --model.d_modle=3"),
        (["--model.position=cope2"], "cope-pl: error: model.position: unknown position encoding 'cope2'"),
        (["--config", "missing.yaml"], 'Parser key "config": File does not exist'),
    ],
    ids=["unknown-key", "unknown-value", "missing-config"],
)
def test_bad_command_line_is_one_line_without_traceback(tmp_path, args, message):
    done = run_cli("fit", "--config", str(CONFIGS / "trainer/smoke.yaml"), "--trainer.logger=false", *args)
    assert done.returncode != 0
    assert message in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


def test_a_nan_batch_makes_the_evaluation_nan_not_the_mean_of_the_others():
    from cope_pl.metrics import EvalSums

    def batch(nll: float) -> dict[str, torch.Tensor]:
        one = torch.tensor(1)
        return {"nll": torch.tensor(nll), "tokens": one, "token_errors": one, "sequences": one, "sequence_errors": one}

    finite = EvalSums(torch.device("cpu"))
    finite.update(batch(3.0)), finite.update(batch(0.0))
    assert finite.compute()["loss"] == 1.5
    diverged = EvalSums(torch.device("cpu"))
    diverged.update(batch(3.0)), diverged.update(batch(float("nan")))
    values = diverged.compute()
    assert torch.isnan(torch.tensor([values["loss"], values["ppl"]])).all()


class DivergesInEvaluation(LanguageModel):
    """Finite in training, NaN logits on one evaluation batch in two."""

    def forward(self, input_ids):
        logits = super().forward(input_ids)
        if not self.training and self.trainer.state.stage in ("validate", "test", "sanity_check"):
            self.eval_batches = getattr(self, "eval_batches", 0) + 1
            if self.eval_batches % 2 == 0:
                return logits * float("nan")
        return logits


def test_a_nan_validation_stops_the_fit_and_a_nan_test_reads_nan(tmp_path):
    kwargs = dict(vocab_size=9, n_layers=1, d_model=16, n_heads=2, max_seq_len=16, position="rope")
    fit = trainer(tmp_path, 4, [NonFiniteGuard()], limit_val_batches=2, val_check_interval=2, num_sanity_val_steps=0)
    with pytest.raises(NonFiniteError, match=r"non-finite validation loss \(val/loss=nan.*at step 2"):
        fit.fit(DivergesInEvaluation(**kwargs), data())
    test = trainer(tmp_path / "t", 1, [NonFiniteGuard()], limit_test_batches=2)
    with pytest.warns(UserWarning, match="non-finite evaluation loss"):
        (metrics,) = test.test(DivergesInEvaluation(**kwargs), data())
    assert metrics["test/loss"] != metrics["test/loss"] and metrics["test/ppl"] != metrics["test/ppl"]  # NaN
