"""`cope-pl plan --config ... [--gpu h100-80gb] [--devices N] [--out DIR]`: what a config would do on a GPU,
found without one.

The configured model, optimizer, precision and validation callbacks are built from the same config files as
`cope-pl fit`, on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data), and one optimizer step and one
validation step are traced under `cope_pl.ops.target_device("cuda")`, so every device decision (the CoPE
implementation, its block sizes) is the one a GPU run takes. Tracing runs on fake CPU tensors: the CPU build of
torch cannot run autograd over fake CUDA ones. `cope_pl.op_costs` turns the trace into peak memory, kernels per
step, FLOPs and a roofline step time for the named GPU. The vocabulary and sequence lengths come from the data
config (`planned_lengths`); nothing is read or downloaded.

`--sweep FILE` plans every cell of a sweep file (seeds aside) and prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch._subclasses.fake_tensor import FakeTensorMode

from cope_pl.cli import CopeCLI
from cope_pl.cope_stats import CopeStatistics, cope_statistics
from cope_pl.cuda_policy import CudaPolicy
from cope_pl.data import LMDataModule
from cope_pl.lm import LanguageModel
from cope_pl.numerics import NonFiniteGuard
from cope_pl.op_costs import GPU_SOURCE, GPUS, Gpu, OpCosts
from cope_pl.ops import COPE_IMPLS, target_device
from cope_pl.position.cope import ContextualPositionEncoding

GIB = 1 << 30
# A plan fits when its traced peak is within this share of the GPU's memory: the caching allocator's rounding and
# fragmentation, the CUDA context and DDP's communication buffers take the rest.
FIT_FRACTION = 0.9
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


class PlanTensorMode(FakeTensorMode):
    """Fake tensors without constants: FakeTensorMode keeps a real copy of one-element tensors made from literals,
    which cannot be deep-copied under it (torchmetrics deep-copies its states); the plan needs no values."""

    def may_turn_const(self, t: torch.Tensor) -> bool:
        return False


@dataclass
class RunSettings:
    """What the plan needs of the trainer config, which it does not instantiate for a GPU."""

    precision: str
    max_steps: int
    accumulate: int
    clip: float | None
    devices: int


class PlanCLI(CopeCLI):
    """The fit CLI's parser and classes, with the model built on fake tensors and a CPU trainer that only serves
    the model's `configure_optimizers` and the callbacks; the GPU trainer settings are kept in `settings`."""

    def __init__(self, *args, fake_mode: FakeTensorMode | None, impl: str | None, devices: int | None, **kwargs):
        self.fake_mode, self.impl, self.devices = fake_mode, impl, devices
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config
        trainer = config.trainer
        precision = str(trainer.precision)
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={precision} is not planned; plan one of {list(PRECISIONS)}")
        devices = self.devices or (trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1)
        self.settings = RunSettings(
            precision=precision,
            max_steps=int(trainer.max_steps or -1),
            accumulate=int(trainer.accumulate_grad_batches or 1),
            clip=trainer.gradient_clip_val,
            devices=devices * int(trainer.num_nodes or 1),
        )
        if self.impl is not None and "cope" in str(config.model.position):
            config.model.position_options = {**(config.model.position_options or {}), "impl": self.impl}
        cpu_trainer = {
            "accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "logger": False,
            "precision": "bf16-mixed" if precision == "bf16-mixed" else "32-true", "enable_progress_bar": False,
            "enable_model_summary": False, "max_steps": max(self.settings.max_steps, 1),
            "max_epochs": -1,
        }  # fmt: skip
        for key, value in cpu_trainer.items():
            trainer[key] = value

    def instantiate_classes(self) -> None:
        with self.fake_mode or contextlib.nullcontext():
            self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self.trainer = self.instantiate_trainer()


def build(
    config_args: list[str], fake: bool, impl: str | None = None, devices: int | None = None, target: str = "cuda"
) -> PlanCLI:
    """The configured classes, built for `target`: model on fake tensors (or real CPU ones), data module, a CPU
    trainer, callbacks."""
    fake_mode = PlanTensorMode(allow_non_fake_inputs=True) if fake else None
    with warnings.catch_warnings(), target_device(target):
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
        warnings.filterwarnings("ignore", message=".*instantiate_classes")
        return PlanCLI(
            LanguageModel,
            LMDataModule,
            subclass_mode_data=True,
            save_config_callback=None,
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
            run=False,
            args=config_args,
            fake_mode=fake_mode,
            impl=impl,
            devices=devices,
        )


def planned_lengths(data: LMDataModule, max_seq_len: int) -> tuple[int, int]:
    """(training, validation) tokens per sequence: the longest each loader can give, within the model's context.

    seq_len is the longest sequence of any set; two tasks train on shorter ones than they evaluate."""
    train = evaluate = data.seq_len
    if hasattr(data, "num_blanks") and hasattr(data, "num_tokens"):  # selective copy: longer sparse test set
        train = 2 * data.num_tokens + data.num_blanks
    if hasattr(data, "ood_max_steps"):  # counting: every statement a set (4 tokens) plus `print x`
        train = 4 * data.max_steps + 2
    return min(train, max_seq_len), min(evaluate, max_seq_len)


def _storage_bytes(tensors) -> int:
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _autocast(precision: str):
    dtype = AUTOCAST.get(precision)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _callback(trainer, kind: type):
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def has_cope(model: LightningModule) -> bool:
    return any(isinstance(m, ContextualPositionEncoding) for m in model.modules())


def _prepare_optimizer(model: LanguageModel, trainer) -> torch.optim.Optimizer:
    """The model's own optimizer, as AdamW runs on CUDA parameters (foreach), after one step on zero gradients:
    that makes its state and leaves the gradients alive, as after any step."""
    model.trainer = trainer  # configure_optimizers reads the trainer's step count
    optimizer = model.configure_optimizers()["optimizer"]
    model.trainer = None  # self.log outside a loop: nothing to log to
    for group in optimizer.param_groups:
        group["foreach"] = True
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer


def _batch(vocab: int, batch: int, length: int) -> dict[str, torch.Tensor]:
    return {name: torch.randint(0, vocab, (batch, length)) for name in ("input_ids", "labels")}  # (B, T) each


def trace(cli: PlanCLI, gpu: Gpu, target: str) -> dict[str, Any]:
    """One optimizer step (forward, backward, clipping, the non-finite guard, AdamW) and one validation step with
    the CoPE statistics callback, traced with every device decision taken for `target`; per phase what `OpCosts`
    counted, and the bytes that live across steps."""
    model, data, trainer, setup = cli.model, cli.datamodule, cli.trainer, cli.settings
    train_len, eval_len = planned_lengths(data, model.hparams.max_seq_len)
    vocab, batch = model.hparams.vocab_size, data.batch_size
    guard, stats = _callback(trainer, NonFiniteGuard) or NonFiniteGuard(), _callback(trainer, CopeStatistics)
    with cli.fake_mode or contextlib.nullcontext():
        weights = _storage_bytes([*model.parameters(), *model.buffers()])
        costs = OpCosts(gpu, baseline=weights)
        cuda = CudaPolicy() if torch.device(target).type == "cuda" else contextlib.nullcontext()
        with target_device(target), cuda, costs, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.trainer.* reference is not registered")
            optimizer = _prepare_optimizer(model, trainer)
            params = [p for p in model.parameters() if p.requires_grad]
            grads, opt_state = _storage_bytes([p.grad for p in params]), _storage_bytes(_optimizer_tensors(optimizer))
            train_batch = _batch(vocab, batch, train_len)
            costs.phase("forward_backward")
            with _autocast(setup.precision):
                loss = model.training_step(train_batch, 0)
            optimizer.zero_grad()  # Lightning: after the forward, before the backward
            loss.backward()
            del loss, train_batch
            costs.phase("optimizer")
            if setup.clip:
                torch.nn.utils.clip_grad_norm_(params, setup.clip, foreach=True)
            guard.on_before_optimizer_step(trainer, model, optimizer)
            optimizer.step()
            costs.phase("validate")
            val_batch = _batch(vocab, batch, eval_len)
            model.eval()
            with torch.no_grad(), _autocast(setup.precision):
                model.validation_step(val_batch, 0)
                if stats is not None and stats.enabled:
                    cope_statistics(model, val_batch["input_ids"][: stats.sequences])
            model.train()
    fb, opt, val = (costs.phases[name] for name in ("forward_backward", "optimizer", "validate"))
    return {
        "weights": weights, "grads": grads, "optimizer_state": opt_state, "train_len": train_len,
        "eval_len": eval_len, "batch": batch, "phases": {"forward_backward": fb, "optimizer": opt, "validate": val},
    }  # fmt: skip


def summarize(traced: dict[str, Any], setup: RunSettings, gpu: Gpu) -> dict[str, Any]:
    """The plan's figures for one implementation: memory in GiB, kernels and seconds per optimizer step."""
    phases = traced["phases"]
    fb, opt, val = phases["forward_backward"], phases["optimizer"], phases["validate"]
    acc = setup.accumulate
    static = traced["weights"] + traced["grads"] + traced["optimizer_state"]
    # DDP keeps a copy of the gradients in its communication buckets.
    ddp = traced["grads"] if setup.devices > 1 else 0
    peak = max(fb.peak_bytes, opt.peak_bytes, val.peak_bytes) + ddp
    step_s = acc * fb.seconds + opt.seconds
    fits = peak <= FIT_FRACTION * gpu.memory_gib * GIB
    out = {
        "peak_memory_gib": round(peak / GIB, 3),
        "kernels_per_step": acc * fb.kernels + opt.kernels,
        "est_step_s": round(step_s, 4),
        "fits": fits,
        "memory_gib": {
            "weights": round(traced["weights"] / GIB, 3),
            "grads": round(traced["grads"] / GIB, 3),
            "optimizer_state": round(traced["optimizer_state"] / GIB, 3),
            "ddp_buckets": round(ddp / GIB, 3),
            "train_peak": round((fb.peak_bytes + ddp) / GIB, 3),
            "activations_at_peak": round((fb.peak_bytes - static) / GIB, 3),
            "validation_peak": round((val.peak_bytes + ddp) / GIB, 3),
        },
        "ops_per_step": acc * fb.ops + opt.ops,
        "tflop_per_step": round((acc * fb.flops + opt.flops) / 1e12, 3),
        "est_total_h": None if setup.max_steps < 1 else round(setup.max_steps * step_s / 3600, 2),
        "validation": {"kernels": val.kernels, "est_s": round(val.seconds, 4)},
        "slowest_ops": {name: round(s, 4) for name, s in fb.by_op.most_common(5)},
    }
    if not fits:
        out["fix"] = fix_line(traced, setup, gpu, peak, static + ddp)
    return out


def fix_line(traced: dict[str, Any], setup: RunSettings, gpu: Gpu, peak: int, static: int) -> str:
    """One line naming a batch size and accumulate_grad_batches that keep the global batch and fit; activations
    are taken to scale with the batch."""
    batch, budget = traced["batch"], FIT_FRACTION * gpu.memory_gib * GIB
    for split in (2, 4, 8, 16, 32, 64):
        if batch % split or batch // split < 1:
            continue
        estimate = static + (peak - static) / split
        if estimate <= budget:
            return (
                f"does not fit ({peak / GIB:.1f} GiB of {gpu.memory_gib:.0f}): use --data.init_args.batch_size="
                f"{batch // split} --trainer.accumulate_grad_batches={setup.accumulate * split} (same global batch, "
                f"about {estimate / GIB:.1f} GiB)"
            )
    return (
        f"does not fit ({peak / GIB:.1f} GiB of {gpu.memory_gib:.0f}) even at batch 1: shorten data.init_args.seq_len "
        "or use a GPU with more memory"
    )


def plan(
    config_args: list[str], gpu_name: str = "h100-80gb", devices: int | None = None, impl: str | None = None
) -> dict[str, Any]:
    """The plan of one config for `gpu_name`: `auto`'s figures at the top level and, with CoPE, the chunked op's
    under `fallback` and the fused Triton kernel's under `fused` (where it takes the config's CoPE). impl: plan
    only that CoPE implementation, no fallback or fused figures."""
    gpu = GPUS[gpu_name]
    cli = build(config_args, fake=True, impl=impl, devices=devices)
    started = time.perf_counter()
    with target_device("cuda"):
        backend = cli.model.model.attention_backend()
    result = summarize(trace(cli, gpu, "cuda"), cli.settings, gpu)
    setup = cli.settings
    result.update(
        gpu=gpu.name, attention=backend, precision=setup.precision, max_steps=setup.max_steps,
        devices=setup.devices, accumulate_grad_batches=setup.accumulate, params=cli.model.num_params,
    )  # fmt: skip
    if has_cope(cli.model) and impl is None:
        result["fallback"] = _four(result) if backend == "chunked" else _plan_impl(config_args, gpu, devices, "chunked")
        if backend != "triton":
            fused = build(config_args, fake=True, impl="triton", devices=devices)
            with target_device("cuda"):
                fusable = fused.model.model.attention_backend() == "triton"
            if fusable:  # the fused kernel takes this CoPE (no relative table or bias)
                try:
                    result["fused"] = _four(summarize(trace(fused, gpu, "cuda"), fused.settings, gpu))
                except ValueError as err:  # a limit of the kernel's (npos_max)
                    result["fused"] = {"unavailable": str(err)}
    result["trace_s"] = round(time.perf_counter() - started, 1)
    return result


def _four(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in ("peak_memory_gib", "kernels_per_step", "est_step_s", "fits")}


def _plan_impl(config_args: list[str], gpu: Gpu, devices: int | None, impl: str) -> dict[str, Any]:
    cli = build(config_args, fake=True, impl=impl, devices=devices)
    return _four(summarize(trace(cli, gpu, "cuda"), cli.settings, gpu))


def table_row(name: str, result: dict[str, Any]) -> str:
    """One markdown row: what `auto` runs, and for CoPE the fused kernel's kernels and step time beside it."""
    fused = result.get("fused")
    if fused is None:
        fused_text = ""
    elif "unavailable" in fused:
        fused_text = "n/a: " + fused["unavailable"].split(";")[0]
    else:
        fused_text = f"{fused['kernels_per_step']:,} / {fused['est_step_s']:.3f}"
    total = "n/a" if result["est_total_h"] is None else f"{result['est_total_h']:.1f}"
    fits = "yes" if result["fits"] else result.get("fix", "no")
    return (
        f"| {name} | {result['attention']} | {result['peak_memory_gib']:.1f} | {result['kernels_per_step']:,} | "
        f"{result['est_step_s']:.3f} | {total} | {fused_text} | {fits} |"
    )


TABLE_HEAD = (
    "| config | attention | peak GiB | kernels/step | est. step s | est. total h "
    "| fused kernels / step s | fits |\n"
    "|---|---|---:|---:|---:|---:|---:|---|"
)


def print_plan(result: dict[str, Any]) -> None:
    mem = result["memory_gib"]
    print(f"{result['gpu']} x{result['devices']}, {result['precision']}, attention: {result['attention']}")
    print(f"  GPU figures: {GPU_SOURCE}")
    print(
        f"  memory per GPU: peak {result['peak_memory_gib']:.2f} GiB (weights {mem['weights']:.2f}, grads "
        f"{mem['grads']:.2f}, optimizer {mem['optimizer_state']:.2f}, activations {mem['activations_at_peak']:.2f}, "
        f"validation step + callbacks {mem['validation_peak']:.2f})"
    )
    total = "n/a (no trainer.max_steps)" if result["est_total_h"] is None else f"{result['est_total_h']:.1f} h"
    print(
        f"  per step: {result['kernels_per_step']:,} kernels, {result['tflop_per_step']:.2f} TFLOP, est. "
        f"{result['est_step_s']:.3f} s; {result['max_steps']} steps: {total}"
    )
    print(f"  fits: {'yes' if result['fits'] else result['fix']}")
    fallback = result.get("fallback")
    if fallback is not None and result["attention"] != "chunked":
        print(
            f"  chunked fallback: peak {fallback['peak_memory_gib']:.2f} GiB, {fallback['kernels_per_step']:,} kernels,"
            f" est. {fallback['est_step_s']:.3f} s per step, fits: {'yes' if fallback['fits'] else 'no'}"
        )
    fused = result.get("fused")
    if fused is not None:
        text = fused.get("unavailable") or (
            f"peak {fused['peak_memory_gib']:.2f} GiB, {fused['kernels_per_step']:,} kernels, est. "
            f"{fused['est_step_s']:.3f} s per step, fits: {'yes' if fused['fits'] else 'no'}"
        )
        print(f"  fused kernel (impl: triton): {text}")


def sweep_configs(path: str) -> list[tuple[str, list[str]]]:
    """(cell name without its seed, config arguments) per distinct cell of a sweep file."""
    from cope_pl.sweep import load_sweep, override_args

    seen, cells = set(), []
    for cell in load_sweep(path).cells:
        name = "-".join(v for k, v in cell.keys.items() if k != "seed")
        if name in seen:
            continue
        seen.add(name)
        cells.append((name, [a for c in cell.configs for a in ("--config", c)] + override_args(cell.overrides)))
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cope-pl plan",
        description="Peak memory, kernels per step and estimated step time of a config on a GPU, traced on fake "
        "tensors (no GPU, no data). Other --key=value options override the config as in `cope-pl fit`.",
    )
    parser.add_argument("--config", action="append", default=[], help="a config file (repeatable, as for fit)")
    parser.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="the GPU to plan for")
    parser.add_argument("--devices", type=int, default=None, help="GPUs per node (default: the trainer config's)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT/plan.json (sweeps: OUT/<cell>.json)")
    parser.add_argument("--sweep", default=None, help="plan every cell of a sweep file; prints a markdown table")
    parser.add_argument(
        "--impl", default=None, choices=[i for i in COPE_IMPLS if i != "auto"],
        help="plan CoPE configs with this implementation only (no fallback and fused figures)",
    )  # fmt: skip
    args, overrides = parser.parse_known_args(argv)
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    if args.sweep is None and not args.config:
        raise ValueError("cope-pl plan needs --config files (as for fit) or --sweep FILE")
    cells = sweep_configs(args.sweep) if args.sweep else [("plan", [a for c in args.config for a in ("--config", c)])]
    if args.sweep:
        print(f"{GPUS[args.gpu].name}; GPU figures: {GPU_SOURCE}\n\n{TABLE_HEAD}")
    for name, config_args in cells:
        result = plan(config_args + overrides, args.gpu, args.devices, args.impl)
        if args.sweep:
            print(table_row(name, result), flush=True)
        else:
            print_plan(result)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
