"""The LightningModule, its metrics, and the cope-pl CLI end to end on the built-in copy task."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from cope_pl.cli import main
from cope_pl.data import IGNORE_INDEX, CopyDataModule
from cope_pl.lm import LanguageModel
from cope_pl.metrics import batch_sums
from cope_pl.resume import read_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
POSITION_CONFIGS = sorted((CONFIGS / "position").glob("*.yaml"))


def test_copy_task_scores_only_the_copy():
    dm = CopyDataModule(seq_len=8, batch_size=2)
    dm.setup()
    item = dm.train_set[3]
    assert item["input_ids"].tolist()[4] == 0  # separator after 4 symbols
    assert (item["labels"][:4] == IGNORE_INDEX).all()
    assert item["labels"][4:].tolist() == item["input_ids"][:4].tolist()  # predict the copy


def test_batch_sums_count_tokens_and_errors():
    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 1.0  # always predicts token 1
    labels = torch.tensor([[1, 1, IGNORE_INDEX], [1, 2, IGNORE_INDEX]])
    sums = batch_sums(logits, labels)
    assert sums["tokens"] == 4 and sums["token_errors"] == 1
    assert sums["sequences"] == 2 and sums["sequence_errors"] == 1
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(sums["nll"], expected)


def fit(tmp_path, position="cope", steps=60):
    L.seed_everything(0)
    dm = CopyDataModule(seq_len=16, batch_size=16, num_symbols=8, eval_size=64)
    model = LanguageModel(
        vocab_size=dm.vocab_size,
        n_layers=2,
        d_model=32,
        n_heads=2,
        max_seq_len=16,
        position=position,
        lr=3e-3,
        warmup_steps=5,
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        val_check_interval=steps,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
    )
    trainer.fit(model, dm)
    return trainer, model, dm


def test_training_lowers_validation_loss(tmp_path):
    trainer, model, dm = fit(tmp_path)
    before = LanguageModel(vocab_size=dm.vocab_size, n_layers=2, d_model=32, n_heads=2, max_seq_len=16)
    start = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_val_batches=2)
    initial = start.validate(before, dm, verbose=False)[0]["val/loss"]
    assert trainer.callback_metrics["val/loss"] < initial - 0.2
    assert {"val/ppl", "val/error", "val/seq_error"} <= set(trainer.callback_metrics)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    trainer, model, _ = fit(tmp_path, steps=3)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = LanguageModel.load_from_checkpoint(path)
    x = torch.randint(0, 9, (2, 16))
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


def test_data_beyond_the_model_vocabulary_is_reported(tmp_path):
    dm = CopyDataModule(seq_len=8, batch_size=4, num_symbols=30)
    model = LanguageModel(vocab_size=10, n_layers=1, d_model=16, n_heads=2)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="model.vocab_size=10"):
        trainer.fit(model, dm)


def cli(tmp_path, *configs, extra=()):
    args = ["fit"]
    for c in (CONFIGS / "trainer/smoke.yaml", CONFIGS / "data/copy.yaml", CONFIGS / "model/tiny.yaml", *configs):
        args += ["--config", str(c)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra]
    main(args)
    return tmp_path / "runs"


@pytest.mark.parametrize("config", POSITION_CONFIGS, ids=lambda p: p.stem)
def test_cli_fast_dev_run_for_every_position_config(tmp_path, config):
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
            "--config",
            str(CONFIGS / "model/tiny.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )


def test_cli_saves_config_logs_and_last_checkpoint(tmp_path):
    runs = cli(tmp_path, CONFIGS / "position/cope.yaml")
    run = runs / "copy-cope" / "version_0"  # the run is named after data and position encoding
    assert "position: cope" in (run / "config.yaml").read_text()
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((run / "results.json").read_text())
    assert results["model"]["position"] == "cope" and results["data"]["class"] == "CopyDataModule"
    assert results["global_step"] == 4 and 0 <= results["metrics"]["val/error"] <= 1


def test_cli_links_vocabulary_from_data(tmp_path):
    cli(tmp_path, CONFIGS / "position/rope.yaml", extra=["--data.init_args.num_symbols", "40"])
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    assert read_checkpoint(ckpt)["hyper_parameters"]["vocab_size"] == 41


def test_cli_print_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "position/cope.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "npos_max: 64" in capsys.readouterr().out


def test_summary_shows_each_named_set_once():
    from cope_pl.results import format_summary

    table = format_summary({"val/error": 0.1, "val/error@in_dist": 0.1, "val/error@ood": 0.5, "val/loss@ood": 2.0})
    header, *rows = table.splitlines()
    assert header.split() == ["metric", "in_dist", "ood"]
    assert [r.split()[0] for r in rows] == ["val/error", "val/loss"]
    assert format_summary({"val/loss": 1.5}).splitlines()[0].split() == ["metric", "-"]
