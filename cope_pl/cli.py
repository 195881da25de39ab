"""`cope-pl fit|validate|test --config a.yaml --config b.yaml ...` through LightningCLI, and the tools
that work on finished runs (`cope-pl eval-context|sweep|report|position-maps`, see TOOLS).

Configs combine: a trainer file, a data file, a model file and a position-encoding file, later ones
overriding earlier ones. The vocabulary size flows from the data module to the model, and the full
config is saved beside each run's TensorBoard logs (runs/<name>/version_N/config.yaml). Checkpointing is
set under `checkpoint:` (ModelCheckpoint's arguments); `fit --ckpt_path last` resumes a killed run in its
own directory.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from cope_pl.callbacks import TokenThroughputMonitor
from cope_pl.data import LMDataModule
from cope_pl.lm import LanguageModel
from cope_pl.numerics import NonFiniteError, NonFiniteGuard
from cope_pl.results import ResultsWriter
from cope_pl.resume import CheckedCheckpointIO, RngState, resolve_resume

# Tools that work on finished runs; each module has its own argparse `main(argv)`.
TOOLS = {
    "eval-context": "cope_pl.eval_context",
    "sweep": "cope_pl.sweep",
    "report": "cope_pl.report",
    "position-maps": "cope_pl.position_maps",
    "launch": "cope_pl.launch",
}
DEFAULT_RUN_NAME = "auto"  # replaced by "<data>-<position>" so TensorBoard runs are told apart


class CopeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "cope_pl.data.CopyDataModule"}})
        # A forced ModelCheckpoint, configurable as `checkpoint.every_n_train_steps: 100` etc.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # Lightning prepares data on local rank 0 of every node; on a shared filesystem once is enough.
        parser.add_argument("--prepare_data_per_node", type=bool, default=True)

    def before_fit(self) -> None:
        self.datamodule.prepare_data_per_node = self.config.fit.prepare_data_per_node

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None:
            return
        if init_args.get("name") == DEFAULT_RUN_NAME:
            data_name = config.data.class_path.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
            init_args["name"] = f"{data_name}-{config.model.position}"
        run_root = Path(init_args.get("save_dir") or ".") / init_args["name"]
        check_writable(run_root)
        if self.subcommand == "fit" and init_args.get("version") is None:
            config.ckpt_path, version = resolve_resume(config.ckpt_path, run_root)
            init_args["version"] = version

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a checkpoint IO a config chose
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()
        return trainer


def check_writable(directory: Path) -> None:
    """Fail before training, not at the first checkpoint, when the log directory cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot write the log directory {directory} ({err.strerror}); "
            "set trainer.logger.init_args.save_dir to a writable place with free space",
        ) from err


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": DEFAULT_RUN_NAME, "default_hp_metric": False},
        },
        # Always present; more callbacks can be added from a config under trainer.callbacks.
        "callbacks": [
            LearningRateMonitor(logging_interval="step"),
            TokenThroughputMonitor(),
            ResultsWriter(),
            RngState(),
            NonFiniteGuard(),
        ],
    }


def main(args: list[str] | None = None) -> CopeCLI | None:
    """`cope-pl fit|validate|test ...` (LightningCLI) or `cope-pl eval-context|sweep|report|position-maps ...`."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return None
    return CopeCLI(
        LanguageModel,
        LMDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


# Errors that are about the user's input or environment: shown as one line, not a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteError)


def entry() -> None:
    """The `cope-pl` console script: main() with user errors as one line (COPE_PL_TRACEBACK=1 shows all)."""
    try:
        main()
    except USER_ERRORS as err:
        if os.environ.get("COPE_PL_TRACEBACK"):
            raise
        sys.exit(f"cope-pl: error: {err}")


if __name__ == "__main__":
    entry()
