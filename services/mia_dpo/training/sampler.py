"""Length-grouped batches for `train.group_by_length`.

Multi-image pairs differ in length by whole images: a five-image sequence is five
images' worth of tokens, a grid or a pic-in-pic one. In a batch drawn at random every
row is padded to the longest, so about half of each step's tokens are padding on the
demo's mix (bench/train_batching.py measures it). Grouping rows of similar length
into the same batch removes most of that.

transformers' own `group_by_length` sorts whole mega-batches longest first, so each
stretch of an epoch would run from the longest rows (sequences) to the shortest
(grids): an ordering by format that DPO would see as a curriculum. Here the rows are
grouped the same way, then the batches themselves are shuffled, so the order of
formats through an epoch stays random; only which rows share a batch changes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

# Rows are grouped within windows of this many batches: wide enough that most
# batches are of one image count, narrow enough that a window still mixes the epoch.
WINDOW_BATCHES = 64


class LengthGroupedBatches(Sampler[int]):
    """Row indices, `batch_size` at a time in batches of similar length, the batches
    in random order. Every row once per epoch; the order depends on (seed, epoch)
    only, so a run resumed mid-epoch sees the same batches as the one it replaces."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected at least 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this at the start of every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)  # one stream per (seed, epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        window = self.batch_size * WINDOW_BATCHES
        out: list[list[int]] = []
        for start in range(0, len(order), window):
            # stable sort on the shuffled order: ties stay in random order
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)
            out += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # The batches in random order: no stretch of the epoch is all long or all short.
        # A short last batch stays last, where the DataLoader expects it.
        full = [b for b in out if len(b) == self.batch_size]
        short = [b for b in out if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return shuffled + short

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    """Real tokens over padded tokens when each batch is padded to its longest row."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return real / padded if padded else 1.0
