"""Two CPU processes under DDP (gloo) train exactly like one process accumulating two batches.

Also: the ranks see different training data, and validation scores every item once, on every rank the
same number of batches, with metrics reduced from sums (equal to a single-process evaluation); and the
`cope-pl` commands run to their end with two processes, logger and every default callback on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from cope_pl.data import CopyDataModule
from cope_pl.lm import LanguageModel
from cope_pl.resume import read_checkpoint

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


class RecordingLM(LanguageModel):
    """Writes every training batch's loss and first token ids to <out>/rank<r>.json."""

    def __init__(self, out: str, **kwargs):
        super().__init__(**kwargs)
        self.out = out
        self.record: list[dict] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.record.append({"loss": float(loss), "ids": batch["input_ids"][:, :4].tolist()})
        return loss

    def on_train_end(self):
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.record))


def train(out: Path, devices: int, accumulate: int) -> tuple[RecordingLM, CopyDataModule, L.Trainer]:
    L.seed_everything(0)
    out.mkdir()
    # 13 validation items: not a multiple of 2 ranks, so one rank gets a blank padding item.
    dm = CopyDataModule(seq_len=16, batch_size=8, num_symbols=8, train_size=256, eval_size=13)
    model = RecordingLM(
        str(out), vocab_size=dm.vocab_size, n_layers=1, d_model=32, n_heads=2, max_seq_len=16, position="cope"
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        accumulate_grad_batches=accumulate,
        max_steps=STEPS,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    return model, dm, trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    ddp = train(root / "ddp", devices=2, accumulate=1)
    single = train(root / "single", devices=1, accumulate=2)
    return root, ddp, single


def read(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def test_ddp_matches_gradient_accumulation_step_for_step(runs):
    root, (ddp_model, _, _), (single_model, _, _) = runs
    rank0, rank1 = read(root / "ddp" / "rank0.json"), read(root / "ddp" / "rank1.json")
    single = read(root / "single" / "rank0.json")
    assert len(rank0) == len(rank1) == STEPS and len(single) == 2 * STEPS
    for step in range(STEPS):
        # Optimizer step s: rank r's batch is the single run's micro-batch 2s + r.
        assert rank0[step]["ids"] == single[2 * step]["ids"] and rank1[step]["ids"] == single[2 * step + 1]["ids"]
        ddp_loss = (rank0[step]["loss"] + rank1[step]["loss"]) / 2
        single_loss = (single[2 * step]["loss"] + single[2 * step + 1]["loss"]) / 2
        assert ddp_loss == pytest.approx(single_loss, abs=1e-5), f"step {step}"
    for (name, p_ddp), p_single in zip(ddp_model.named_parameters(), single_model.parameters()):
        torch.testing.assert_close(p_ddp, p_single, atol=1e-5, rtol=1e-4, msg=name)


def test_ranks_train_on_different_data(runs):
    root = runs[0]
    rank0, rank1 = read(root / "ddp" / "rank0.json"), read(root / "ddp" / "rank1.json")
    assert all(a["ids"] != b["ids"] for a, b in zip(rank0, rank1))


def test_ddp_validation_equals_single_process_validation(runs):
    _, (trained, used_dm, _), _ = runs

    def fresh():  # new objects for each trainer: a spawn pickles them, and trainers leave state on them
        model = LanguageModel(**{k: v for k, v in trained.hparams.items() if k != "out"})
        model.load_state_dict(trained.state_dict())
        return model, CopyDataModule(**used_dm.hparams)

    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False)
    got = ddp.validate(*fresh(), verbose=False)[0]
    single = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    expected = single.validate(*fresh(), verbose=False)[0]
    for key in ("val/loss", "val/error", "val/seq_error"):
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key


def cope_pl(*args: str) -> subprocess.CompletedProcess:
    # Outside any SLURM job the tests may run in: its preemption warning would requeue that job.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(
        [sys.executable, "-m", "cope_pl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, f"cope-pl {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return done


def test_cope_pl_fit_test_and_eval_context_run_to_their_end_with_two_processes(tmp_path):
    # What `cope-pl fit` users get (TensorBoard logger, every default callback), on 2 gloo processes; rank 1 alone
    # gets the preemption warning after step 2, and both ranks checkpoint at the same step.
    warning = {
        "class_path": "tests.fault_injection.SignalAtStep",
        "init_args": {"step": 2, "name": "SIGUSR1", "rank": 1},
    }
    fit = cope_pl(
        "fit",
        *("--config", str(CONFIGS / "trainer/smoke.yaml")),
        *("--config", str(CONFIGS / "data/copy.yaml")),
        *("--config", str(CONFIGS / "model/tiny.yaml")),
        *("--config", str(CONFIGS / "position/cope.yaml")),
        *("--trainer.devices=2", "--trainer.strategy=ddp"),
        *("--data.init_args.train_size=512", "--data.init_args.eval_size=64"),
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.callbacks+=" + json.dumps(warning),
    )
    assert "(2 processes x 32 x 1 accumulation)" in fit.stdout + fit.stderr
    run = tmp_path / "copy-cope" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["fit_finished"] is True and results["global_step"] == 4 and results["run_dir"] == str(run)
    assert {"val/loss", "val/error", "val_cope/max_clamped_frac"} <= set(results["metrics"])
    assert read_checkpoint(run / "checkpoints" / "hpc_ckpt_1.ckpt")["global_step"] == 2
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4

    test = cope_pl("test", str(run))
    assert "GLOBAL_RANK: 1" in test.stdout + test.stderr  # the run's own config: 2 processes again
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == {"fit": 4, "test": 4} and results["fit_finished"] is True
    assert results["metrics"]["test/loss"] == pytest.approx(results["metrics"]["val/loss"], abs=1e-6)  # same set

    cope_pl("eval-context", str(run), "--lengths", "1x", "2x")
    rows = json.loads((run / "eval_context.json").read_text())
    assert sorted({row["seq_len"] for row in rows if row["status"] == "ok"}) == [64, 128]
