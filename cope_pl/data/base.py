"""What every data source gives the LM: a vocabulary size and batches of input_ids/labels.

Subclasses fill in `vocab_size`, `setup` (building `train_set` and `eval_sets`) and, if they read or write
files, `prepare_data`. Evaluation sets are named (`eval_names`) so metrics read `val/error@ood_dense`.

`seed` chooses the training data: the generated training sequences (or the windows of a corpus) and their
order. `eval_seed` chooses generated evaluation sets, so runs of different seeds score one fixed benchmark.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cope_pl.data.sampling import ResumableBatchSampler, pad_for_ranks

IGNORE_INDEX = -100


def shift_labels(tokens: torch.Tensor, scored: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A sequence of T+1 tokens -> input_ids (T) and next-token labels (T).

    scored (T+1 bool) marks the tokens that count as targets; the others get IGNORE_INDEX.
    """
    labels = tokens[1:].clone()
    if scored is not None:
        labels[~scored[1:]] = IGNORE_INDEX
    return {"input_ids": tokens[:-1], "labels": labels}


class LMDataModule(L.LightningDataModule):
    def __init__(
        self, seq_len: int = 128, batch_size: int = 32, num_workers: int = 0, seed: int = 0, eval_seed: int = 0
    ):
        super().__init__()
        self.save_hyperparameters()  # also records the subclass's arguments, for results.json
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"data.seq_len and data.batch_size must be >= 1, got {seq_len} and {batch_size}")
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.eval_seed = eval_seed
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] = {}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def text_codec(self):
        """How prompts become token ids and ids become text (`cope_pl.data.codec`); by default, plain ids."""
        from cope_pl.data.codec import TokenIdCodec

        return TokenIdCodec(self.vocab_size)

    @property
    def eval_names(self) -> list[str]:
        return list(self.eval_sets)

    def _world(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer; (1, 0) outside a trainer."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _batches_done_this_epoch(self) -> int:
        """Training batches the restored checkpoint already ran in its current epoch (0 unless resuming)."""
        trainer = self.trainer
        if trainer is None or not trainer.fit_loop.restarting:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Its own generator: creating an iterator never draws from the global RNG that dropout uses,
            # so a resumed run's dropout masks match an uninterrupted run's.
            generator=torch.Generator().manual_seed(self.seed),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._world()
        sampler = ResumableBatchSampler(
            self.train_set, self.batch_size, seed=self.seed, num_replicas=world_size, rank=rank
        )
        # A checkpoint taken at the end of an epoch restarts at the next epoch's first batch.
        sampler.start_batch = self._batches_done_this_epoch() % sampler.batches_per_rank
        return self._loader(self.train_set, sampler=sampler)

    def _eval_loaders(self, sets: dict[str, Dataset]) -> list[DataLoader]:
        world_size, _ = self._world()
        return [self._loader(pad_for_ranks(d, world_size, IGNORE_INDEX)) for d in sets.values()]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_sets)

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
