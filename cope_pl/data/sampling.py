"""Sample orders that survive a restart and split evenly across DDP ranks.

Training: `ResumableBatchSampler` draws one permutation per (seed, epoch) and deals out *whole batches*:
optimizer step s of a W-rank run uses batches s*W .. s*W+W-1 of that permutation, which are exactly the
batches a 1-process run with `accumulate_grad_batches: W` uses for step s. A resumed run starts the epoch
at the batch where the checkpoint left it, so the data order of an interrupted run equals an
uninterrupted one.

Evaluation: `pad_for_ranks` pads a set with blank items (no scored labels) up to a multiple of the world
size, so every rank runs the same number of batches (no hang) and no item is scored twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from cope_pl.seeding import generator

# Lightning warns that a mid-epoch checkpoint cannot resume a plain DataLoader; this sampler does resume it.
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")


class ResumableBatchSampler(DistributedSampler):
    """Yields this rank's item indices, one whole batch at a time, from `start_batch` on.

    A DistributedSampler subclass, so Lightning keeps it under DDP instead of wrapping it; Lightning
    calls `set_epoch` at every epoch start.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.batches_per_rank = len(dataset) // (batch_size * num_replicas)
        if self.batches_per_rank == 0:
            raise ValueError(
                f"the training set has {len(dataset)} items, fewer than one batch per rank "
                f"(data.batch_size={batch_size} x {num_replicas} ranks); lower data.batch_size or add data"
            )
        self.num_samples = self.batches_per_rank * batch_size
        self.total_size = self.num_samples * num_replicas
        self.start_batch = 0  # set when resuming mid-epoch; applies to the next epoch iterated only

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = generator(self.seed, self.epoch)
            order = torch.randperm(len(self.dataset), generator=g)
        else:
            order = torch.arange(len(self.dataset))
        start, self.start_batch = self.start_batch, 0
        step_items = self.batch_size * self.num_replicas
        for batch in range(start, self.batches_per_rank):
            first = batch * step_items + self.rank * self.batch_size
            yield from order[first : first + self.batch_size].tolist()

    def __len__(self) -> int:
        # The full epoch, also when resuming: Lightning counts the batches it already ran itself.
        return self.num_samples


class PaddedEvalSet(Dataset):
    """`dataset` followed by blank items (copies of item 0 with every label ignored) up to `length`."""

    def __init__(self, dataset: Dataset, length: int, ignore_index: int):
        self.dataset = dataset
        self.length = length
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < len(self.dataset):
            return self.dataset[index]
        item = dict(self.dataset[0])
        item["labels"] = torch.full_like(item["labels"], self.ignore_index)  # scores nothing, counts no sequence
        return item


def pad_for_ranks(dataset: Dataset, world_size: int, ignore_index: int) -> Dataset:
    """Pad to a multiple of world_size so DDP's sampler splits it evenly without repeating items."""
    n = len(dataset)
    padded = -(-n // world_size) * world_size
    return dataset if padded == n else PaddedEvalSet(dataset, padded, ignore_index)
