"""`cope-pl fit|validate|test --config a.yaml --config b.yaml ...` through LightningCLI, `cope-pl test RUN_DIR`
to test a finished run in place, and the tools that work on finished runs (see TOOLS).

Configs combine: a trainer file, a data file, a model file and a position-encoding file, later ones
overriding earlier ones. The vocabulary size flows from the data module to the model, and the full
config is saved beside each run's TensorBoard logs (runs/<name>/version_N/config.yaml). Checkpointing is
set under `checkpoint:` (ModelCheckpoint's arguments); `fit --ckpt_path last` resumes a killed run in its
own directory.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from argparse import ArgumentError
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cope_pl.cope_stats import CopeStatistics
from cope_pl.data import LMDataModule
from cope_pl.last_step import LastStepEvaluation
from cope_pl.lm import LanguageModel
from cope_pl.numerics import NonFiniteError, NonFiniteGuard
from cope_pl.preemption import PreemptionCheckpoint
from cope_pl.results import ResultsWriter, fit_finished, read_results
from cope_pl.resume import CORRUPT, CheckedCheckpointIO, RngState, checkpoint_error, refuse_untrusted, resolve_resume
from cope_pl.runs import RESULTS_FILE, resolve_run, version_of
from cope_pl.throughput import TokenThroughputMonitor

# Tools that work on finished runs; each module has its own argparse `main(argv)`.
TOOLS = {
    "eval-context": "cope_pl.eval_context",
    "passkey": "cope_pl.eval_passkey",
    "sweep": "cope_pl.sweep",
    "report": "cope_pl.reporting.report",
    "position-maps": "cope_pl.position_maps",
    "count-probe": "cope_pl.count_probe",
    "generate": "cope_pl.generate",
    "launch": "cope_pl.launch",
    "plan": "cope_pl.plan",
}
# What `cope-pl --help` lists, one line each.
COMMANDS = {
    "fit": "train a model: cope-pl fit --config trainer.yaml --config data.yaml --config position.yaml ...",
    "validate": "score a checkpoint on the validation sets (same options as fit, plus --ckpt_path)",
    "test": "test a finished run in place: cope-pl test RUN_DIR [--ckpt_path=FILE] (metrics join its results.json)",
    "eval-context": "score a run at other context lengths: cope-pl eval-context RUN_DIR --lengths 1x 2x 4x",
    "passkey": "passkey retrieval by length and depth: cope-pl passkey RUN_DIR --lengths 1x 2x 4x 8x",
    "sweep": "run an ablation grid: cope-pl sweep configs/sweeps/FILE.yaml [--slurm]",
    "report": "tables and figures from finished runs: cope-pl report RUNS_DIR --out reports/",
    "position-maps": "draw CoPE gates, positions and attention of a run: cope-pl position-maps RUN_DIR",
    "count-probe": "what each CoPE head of a Counting run counts: cope-pl count-probe RUN_DIR [--set ood_long]",
    "generate": "continue a prompt with a trained run: cope-pl generate RUN_DIR --prompt TEXT [--max-new-tokens N]",
    "launch": "multi-node training: write a SLURM job script (--submit: sbatch it) or print a torchrun command",
    "plan": "memory, kernels and step time of a config on a GPU, without one: cope-pl plan --config ... [--gpu NAME]",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test")
DEFAULT_RUN_NAME = "auto"  # replaced by "<data>-<position>" so TensorBoard runs are told apart
DEFAULT_SAVE_DIR = "runs"  # runs go to <save_dir>/<name>/version_N


class CopeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "cope_pl.data.CopyDataModule"}})
        # A forced ModelCheckpoint, configurable as `checkpoint.every_n_train_steps: 100` etc.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # CoPE gate and position statistics at every validation, off with `--cope_stats.enabled=false`.
        parser.add_lightning_class_args(CopeStatistics, "cope_stats")
        # Lightning prepares data on local rank 0 of every node; on a shared filesystem once is enough.
        parser.add_argument("--prepare_data_per_node", type=bool, default=True)

    def before_fit(self) -> None:
        self.datamodule.prepare_data_per_node = self.config.fit.prepare_data_per_node

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_accelerator(config.trainer.get("accelerator"))
        logger = config.trainer.get("logger")
        init_args = getattr(logger, "init_args", None)
        if init_args is None:
            return
        root_dir = config.trainer.get("default_root_dir")
        if root_dir is not None and init_args.get("save_dir") == DEFAULT_SAVE_DIR:
            # Lightning ignores default_root_dir for a logger's runs: take it as the logger's save_dir (a save_dir
            # given explicitly is the more specific of the two and wins).
            init_args["save_dir"] = str(root_dir)
        if init_args.get("name") == DEFAULT_RUN_NAME:
            data_name = config.data.class_path.rsplit(".", 1)[-1].removesuffix("DataModule").lower()
            init_args["name"] = f"{data_name}-{config.model.position}"
        run_root = Path(init_args.get("save_dir") or ".") / init_args["name"]
        check_writable(run_root)
        if self.subcommand == "fit" and init_args.get("version") is None:
            config.ckpt_path, version = resolve_resume(config.ckpt_path, run_root)
            init_args["version"] = version

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the hyper-parameters of --ckpt_path here (weights-only), before the trainer and its
        # CheckedCheckpointIO exist: the same allowlist first, and the same one-line errors.
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        if ckpt_path and Path(ckpt_path).is_file():
            refuse_untrusted(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except CORRUPT as err:
            raise checkpoint_error(ckpt_path, err) from err

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` is left out: the LM has no prediction step to offer.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_COMMANDS}

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a checkpoint IO a config chose
            trainer.strategy.checkpoint_io = CheckedCheckpointIO()
        return trainer


class FitConfigSaver(SaveConfigCallback):
    """Saves the config beside a run's logs when it is trained; validate and test leave the fit's config.yaml
    as it is (and write none into the working directory when logging is off)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def check_accelerator(accelerator) -> None:
    """A GPU trainer config where torch sees no GPU: one line that names the fix, before anything is built
    (Lightning's own message, "No supported gpu backend found!", names neither)."""
    kind = str(accelerator).lower()
    if (
        kind not in ("gpu", "cuda")
        or torch.cuda.is_available()
        or (kind == "gpu" and torch.backends.mps.is_available())
    ):
        return
    raise ValueError(
        f"trainer.accelerator={accelerator}, but torch {torch.__version__} sees no GPU on this machine; run it on a "
        "GPU machine, or on the CPU with --trainer.accelerator=cpu --trainer.devices=1 --trainer.strategy=auto "
        "(training: or configs/trainer/cpu.yaml in place of the GPU trainer config)"
    )


def check_writable(directory: Path) -> None:
    """Fail before training, not at the first checkpoint, when the log directory cannot be written.

    Directories made for the probe are removed again, so a run that fails later (a bad option) leaves nothing."""
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        for made in created:  # innermost first
            made.rmdir()
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
            "init_args": {"save_dir": DEFAULT_SAVE_DIR, "name": DEFAULT_RUN_NAME, "default_hp_metric": False},
        },
        # Always present; more callbacks can be added from a config under trainer.callbacks.
        "callbacks": [
            TokenThroughputMonitor(),
            ResultsWriter(),
            RngState(),
            NonFiniteGuard(),
            LastStepEvaluation(),
            PreemptionCheckpoint(),
        ],
    }


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cope-pl COMMAND [options]   (cope-pl COMMAND --help for a command's options)", "", "commands:"]
    return "\n".join(lines + [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()])


def test_in_place_args(target: str, rest: list[str]) -> list[str]:
    """`test RUN_DIR [overrides]` -> LightningCLI arguments that test the run's last checkpoint with its own config
    and log into the run's own directory (a later --ckpt_path in `rest` wins)."""
    run, ckpt = resolve_run(target)
    results = read_results(run / RESULTS_FILE) if (run / RESULTS_FILE).is_file() else {}
    if not fit_finished(results):
        raise ValueError(
            f"{run} has not finished training (no finished fit in its {RESULTS_FILE}); "
            f"finish it first: cope-pl fit --config {run / 'config.yaml'} --ckpt_path last"
        )
    version = version_of(run)
    version = run.name if version is None else version
    logger = {"save_dir": run.parent.parent, "name": run.parent.name, "version": version}
    return (
        ["test", "--config", str(run / "config.yaml"), f"--ckpt_path={ckpt}"]
        + [f"--trainer.logger.init_args.{key}={value}" for key, value in logger.items()]
        + rest
    )


class WithoutAdverts(logging.Filter):
    """Drops Lightning's product tips (e.g. its cloud-logging service) and FOREIGN_LOG_NOTES from the log;
    everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith((LIGHTNING_TIP, *FOREIGN_LOG_NOTES))


LIGHTNING_TIP = "\U0001f4a1 Tip:"  # how Lightning's adverts begin
FOREIGN_LOG_NOTES = (
    # Logged at every save that does not name `weights_only` (it means: the optimizer state is saved too). It reads
    # as if checkpoints were loaded unsafely; cope-pl loads every checkpoint weights-only (cope_pl/resume.py).
    "`weights_only` was not set, defaulting to `False`",
)
FOREIGN_NOTICES = (
    # A torch deprecation that Lightning's own code triggers: nothing a cope-pl user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning's hint on any machine with an `srun` binary; cope-pl's SLURM route is `cope-pl launch`.
    r"The `srun` command is available on your system but is not used",
    # cope-pl passes sys.argv's arguments, possibly rewritten (test RUN_DIR): Lightning's warning about both.
    r".*LightningCLI's args parameter",
)


def quiet_foreign_noise() -> None:
    """The output is cope-pl's own: no adverts, no notices about Lightning's internals or its SLURM hint. Other
    warnings, Lightning's included, still show."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        log = logging.getLogger(name)
        if not any(isinstance(f, WithoutAdverts) for f in log.filters):
            log.addFilter(WithoutAdverts())
    for message in FOREIGN_NOTICES:
        warnings.filterwarnings("ignore", message=message)


def main(args: list[str] | None = None) -> CopeCLI | None:
    """`cope-pl fit|validate|test ...` (LightningCLI), `cope-pl test RUN_DIR` or one of TOOLS."""
    quiet_foreign_noise()
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if argv[0] != "fit":
        # Before any trainer exists: Lightning installs its SLURM handler (a checkpoint into the working directory
        # and a requeue) only where SIGUSR1 has no handler yet.
        ignore_time_limit_warning()
    if argv[0] in TOOLS:
        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return None
    if argv[0] not in LIGHTNING_COMMANDS:
        raise ValueError(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (cope-pl --help)")
    if argv[0] == "test" and len(argv) > 1 and not argv[1].startswith("-"):
        argv = test_in_place_args(argv[1], argv[2:])
    if argv[0] in ("validate", "test") and not any(a.startswith("--verbose") for a in argv):
        # The metrics are printed once, by ResultsWriter; --verbose=true adds Lightning's table of them.
        argv.append("--verbose=false")
    no_exit = {"exit_on_error": False}  # parse errors reach entry() and become one line
    return CopeCLI(
        LanguageModel,
        LMDataModule,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        save_config_callback=FitConfigSaver,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        parser_kwargs={**no_exit, **{name: no_exit for name in LIGHTNING_COMMANDS}},
        args=argv,
    )


# Errors that are about the user's input or environment: shown as one line, not a traceback.
USER_ERRORS = (ValueError, OSError, NonFiniteError, ArgumentError, MisconfigurationException)
# Lines of a jsonargparse error that only frame the real complaint.
FRAMING = ("Does not validate against", "Subtypes:", "Errors:", "Given value type", "Expected a <class 'NoneType'>")


def one_line(err: BaseException) -> str:
    """An error message on one line; a parse error keeps only the lines that say what is wrong."""
    lines = [line.strip(" -") for line in str(err).splitlines() if line.strip(" -")]
    if isinstance(err, ArgumentError):
        lines = [line for line in lines if not line.startswith(FRAMING)]
        lines.append("see the command's --help")
    return "; ".join(line.rstrip(":") for line in lines)


def entry() -> None:
    """The `cope-pl` console script: main() with user errors as one line (COPE_PL_TRACEBACK=1 shows all)."""
    try:
        main()
    except SIGTERMException:
        # Lightning stops its loops at SIGTERM with a SystemExit that would exit 0, as if the run had finished.
        print("cope-pl: stopped by SIGTERM; continue the run with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except USER_ERRORS as err:
        if os.environ.get("COPE_PL_TRACEBACK"):
            raise
        sys.exit(f"cope-pl: error: {one_line(err)}")
    finally:
        end_process_group()


def ignore_time_limit_warning() -> None:
    """SIGUSR1 is SLURM's warning before a job's time limit (`--signal=SIGUSR1@90` in cope-pl's job scripts). Its
    default action ends the process, and inside a SLURM job Lightning's own handler answers it with a checkpoint in
    the working directory and a requeue of the job. Training answers it with a checkpoint of its own
    (cope_pl/preemption.py); the other commands have nothing to save, so they go on: finished in time, or stopped
    at the limit by SIGTERM and run again with the job's unfinished steps."""
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def end_process_group() -> None:
    """A multi-process run ends its process group itself: left to the interpreter's teardown, gloo's worker
    threads can be destroyed while still joinable, and a rank aborts at exit ('terminate called without an
    active exception') after a run that finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    entry()
