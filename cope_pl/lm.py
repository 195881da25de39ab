"""LightningModule for next-token training of a TransformerLM."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from cope_pl.metrics import EvalSums, batch_sums, metric_key, perplexity
from cope_pl.model import TransformerLM

Batch = dict[str, Tensor]  # input_ids (B, T) and labels (B, T), labels[t] is the token after input_ids[t]

# Hyperparameters that decide the weights' shapes and meaning: a checkpoint must agree on all of them.
ARCHITECTURE = ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "norm", "position")
# Position options that choose an implementation, not the function computed: free to change on resume.
IMPLEMENTATION_OPTIONS = ("impl", "compile")


class LanguageModel(L.LightningModule):
    """Transformer LM with a configurable position encoding, AdamW, linear warmup + cosine decay.

    Args:
        vocab_size: filled in from the data module by the CLI.
        position: name of the position encoding (see `cope_pl.position.available()`).
        position_options: keyword options of that encoding, e.g. {npos_max: 64} for cope.
        ignore_index: label value that is not scored (tasks score only their answer tokens).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        n_layers: int = 4,
        d_model: int = 256,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 512,
        dropout: float = 0.0,
        norm: str = "pre",
        position: str = "rope",
        position_options: dict[str, Any] | None = None,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ignore_index: int = -100,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = TransformerLM(
            vocab_size=vocab_size,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            max_seq_len=max_seq_len,
            dropout=dropout,
            norm=norm,
            position=position,
            position_options=position_options,
        )
        self._eval_sums: dict[str, EvalSums] = {}
        self.checkpoint_step: int | None = None  # the global step of a loaded checkpoint (`cope-pl test`)
        self.validated_step: int | None = None  # the global step of the fit's latest validation
        self.num_params = sum(p.numel() for p in self.model.parameters())

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _check_batch(self, batch: Batch) -> None:
        ids = batch["input_ids"]
        if int(ids.max()) >= self.hparams.vocab_size:
            raise ValueError(
                f"data has token id {int(ids.max())} but model.vocab_size={self.hparams.vocab_size}; "
                "let the CLI link the vocabulary from the data module or raise model.vocab_size"
            )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if batch_idx == 0:
            self._check_batch(batch)
        # Read by Lightning's ThroughputMonitor: the usual 6 * params * tokens estimate, attention excluded.
        self.flops_per_batch = 6 * self.num_params * batch["input_ids"].numel()
        logits = self(batch["input_ids"])  # (B, T, V)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=self.hparams.ignore_index
        )
        self.log("train/loss", loss, prog_bar=True)
        if self._trainer is not None and self.trainer.optimizers:  # the rate this batch's update uses
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        # Logged at the step this batch's update completes (1 for the first batch), as checkpoints count steps:
        # Lightning's own default is one less, so validation after 600 steps would show at 599.
        self.log("step", float(self.trainer.global_step + 1) if self._trainer is not None else 0.0)
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint of another model instead of a long state_dict mismatch."""
        self.checkpoint_step = int(checkpoint.get("global_step", 0))
        saved = checkpoint.get("hyper_parameters", {})

        def options(hp: dict[str, Any]) -> dict[str, Any]:
            opts = hp.get("position_options") or {}
            return {k: v for k, v in opts.items() if k not in IMPLEMENTATION_OPTIONS}

        diffs = [
            f"{key}={saved[key]!r} (this run: {self.hparams[key]!r})"
            for key in ARCHITECTURE
            if key in saved and saved[key] != self.hparams[key]
        ]
        if "position_options" in saved and options(saved) != options(self.hparams):
            diffs.append(f"position_options={options(saved)} (this run: {options(self.hparams)})")
        if diffs:
            raise ValueError(
                f"the checkpoint is of a different model: {', '.join(diffs)}; "
                "use the config.yaml saved beside it, or drop --ckpt_path to start a new run"
            )

    # Evaluation: every val/test set of the data module gets its own named metrics.
    def _set_name(self, dataloader_idx: int) -> str:
        names = getattr(self.trainer.datamodule, "eval_names", None) if self._trainer else None
        return names[dataloader_idx] if names else ("" if dataloader_idx == 0 else str(dataloader_idx))

    def _eval_step(self, stage: str, batch: Batch, batch_idx: int, dataloader_idx: int) -> None:
        if batch_idx == 0:
            self._check_batch(batch)
        key = f"{stage}:{self._set_name(dataloader_idx)}"
        if key not in self._eval_sums:
            self._eval_sums[key] = EvalSums(self.device)
        logits = self(batch["input_ids"])
        self._eval_sums[key].update(batch_sums(logits, batch["labels"], self.hparams.ignore_index))

    def _tokens_per_word(self, stage: str, set_name: str) -> float | None:
        """BPE tokens per original word of the evaluated split, from data modules that know it (WikiText)."""
        ratios = getattr(self.trainer.datamodule, "tokens_per_word", None) if self._trainer else None
        return (ratios or {}).get(stage, {}).get(set_name)

    def evaluated_step(self) -> int:
        """The training step the evaluated weights come from: a tested checkpoint's, the fit's latest validation's,
        else the trainer's."""
        if self._trainer is not None and self.trainer.state.fn != "fit" and self.checkpoint_step is not None:
            return self.checkpoint_step
        if self._trainer is not None and self.trainer.state.fn == "fit" and self.validated_step is not None:
            return self.validated_step
        return self.trainer.global_step if self._trainer is not None else 0

    def _eval_epoch_end(self, stage: str) -> None:
        first = True
        for key in [k for k in self._eval_sums if k.startswith(stage + ":")]:
            set_name = key.split(":", 1)[1]
            values = self._eval_sums.pop(key).compute()
            ratio = self._tokens_per_word(stage, set_name)
            if ratio is not None:  # word-level perplexity: the same summed NLL over the split's original words
                values["word_ppl"] = perplexity(values["loss"], ratio)
            for metric, value in values.items():
                self.log(metric_key(stage, metric, set_name), value, sync_dist=False, prog_bar=metric == "loss")
                if first and set_name:  # the first set also answers to the plain name, for checkpoint monitors
                    self.log(metric_key(stage, metric), value, sync_dist=False)
            first = False
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.validated_step = self.trainer.global_step
        # Lightning logs validation at one step less than the updates done (599 after 600) and metrics outside
        # fit at step 0, unless a `step` value says otherwise: they belong to the evaluated weights' step.
        self.log("step", float(self.evaluated_step()), sync_dist=False)

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        # No weight decay on norms, biases, embeddings and position tables (anything not a 2-D weight matrix
        # of a Linear layer).
        linear_weights = {id(m.weight) for m in self.modules() if isinstance(m, torch.nn.Linear)}
        linear_weights.discard(id(self.model.tok_emb.weight))
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if id(p) in linear_weights]
        no_decay = [p for p in params if id(p) not in linear_weights]
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(hp.warmup_steps, total)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
