import os

# Triton reads TRITON_INTERPRET when it is first imported (lightning imports it): set it before anything else so the
# fused CoPE kernel tests run on CPU tensors in Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# COPE_TEST_DEVICE=cuda (with TRITON_INTERPRET=0) runs the fused-kernel tests on a GPU, compiled for it, with the
# fixed test tiles: autotuning each tiny shape would compile every tile candidate.
TEST_DEVICE = torch.device(os.environ.get("COPE_TEST_DEVICE", "cpu"))
if TEST_DEVICE.type == "cuda":
    from cope_pl.ops import cope_triton

    cope_triton.AUTOTUNE = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(position: str, **kwargs):
    from cope_pl.model import TransformerLM

    defaults = dict(vocab_size=23, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, position=position)
    defaults.update(kwargs)
    return TransformerLM(**defaults)


def fitted_run(root, name: str, data_class: str, data: dict, position: str, steps: int = 2, **model_kwargs):
    """A run directory as `cope-pl fit` leaves it (config.yaml, checkpoints/last.ckpt) for a 1-layer d_model-16
    model trained `steps` steps; returns (run, trainer, model, datamodule)."""
    import lightning as L
    import yaml

    from cope_pl.lm import LanguageModel
    from cope_pl.runs import import_class

    run = root / name / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    config = {"data": {"class_path": data_class, "init_args": data}, "seed_everything": 0}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    L.seed_everything(0)
    dm = import_class(data_class)(**data)
    model = LanguageModel(
        vocab_size=dm.vocab_size, n_layers=1, d_model=16, n_heads=2, position=position, **model_kwargs
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(model, dm)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run, trainer, model, dm
