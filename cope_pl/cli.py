"""`cope-pl fit|validate|test --config a.yaml --config b.yaml ...` through LightningCLI, and the tools
that work on finished runs (`cope-pl eval-context|sweep|report|position-maps`, see TOOLS).

Configs combine: a trainer file, a data file, a model file and a position-encoding file, later ones
overriding earlier ones. The vocabulary size flows from the data module to the model, and the full
config is saved beside each run's TensorBoard logs (runs/<name>/version_N/config.yaml).
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from cope_pl.callbacks import TokenThroughputMonitor
from cope_pl.data import LMDataModule
from cope_pl.lm import LanguageModel
from cope_pl.results import ResultsWriter

# Tools that work on finished runs; each module has its own argparse `main(argv)`.
TOOLS = {
    "eval-context": "cope_pl.eval_context",
    "sweep": "cope_pl.sweep",
    "report": "cope_pl.report",
    "position-maps": "cope_pl.position_maps",
}
DEFAULT_RUN_NAME = "auto"  # replaced by "<data>-<position>" so TensorBoard runs are told apart


class CopeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "cope_pl.data.CopyDataModule"}})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is not None and init_args.get("name") == DEFAULT_RUN_NAME:
            data_name = config.data.class_path.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
            init_args["name"] = f"{data_name}-{config.model.position}"


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": DEFAULT_RUN_NAME, "default_hp_metric": False},
        },
        # Always present; more callbacks can be added from a config under trainer.callbacks.
        "callbacks": [
            ModelCheckpoint(save_last=True),
            LearningRateMonitor(logging_interval="step"),
            TokenThroughputMonitor(),
            ResultsWriter(),
        ],
    }


def main(args: list[str] | None = None) -> None:
    """`cope-pl fit|validate|test ...` (LightningCLI) or `cope-pl eval-context|sweep|report|position-maps ...`."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in TOOLS:
        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return
    CopeCLI(
        LanguageModel,
        LMDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
