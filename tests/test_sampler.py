"""LengthGroupedBatches (train.group_by_length): every row once per epoch, batches of
one length where the data allow, batches in an order that depends on seed and epoch
only, and no stretch of the epoch that is all long or all short rows."""

from __future__ import annotations

import itertools
import random

import pytest

from mia_dpo.training.sampler import WINDOW_BATCHES, LengthGroupedBatches, padding_efficiency

# the demo's shape: 1-image rows (grids, pic-in-pic, single) and 2-5 image sequences
rng = random.Random(0)
LENGTHS = [64 * rng.choice([1, 1, 1, 2, 3, 4, 5]) + rng.randrange(20, 40) for _ in range(586)]


def batches_of(sampler: LengthGroupedBatches) -> list[list[int]]:
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    s = LengthGroupedBatches(LENGTHS, 8, seed=3)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert sorted(first) == sorted(second) == list(range(len(LENGTHS)))
    assert first != second
    s.set_epoch(0)
    assert list(s) == first  # a resumed run replays the same epoch
    assert list(LengthGroupedBatches(LENGTHS, 8, seed=4)) != first


def test_batches_are_of_one_image_count_and_pad_less_than_random() -> None:
    s = LengthGroupedBatches(LENGTHS, 8, seed=0)
    grouped = batches_of(s)
    images = [{LENGTHS[i] // 64 for i in b} for b in grouped]
    # a batch mixes counts only where one count ends and the next begins in a window
    windows = -(-len(LENGTHS) // (8 * WINDOW_BATCHES))
    assert sum(len(n) > 1 for n in images) <= windows * 4
    order = list(range(len(LENGTHS)))
    random.Random(1).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding_efficiency(LENGTHS, grouped) > 0.9
    assert padding_efficiency(LENGTHS, shuffled) < 0.7


def test_batch_order_is_not_sorted_by_length() -> None:
    """The epoch does not run from long rows to short ones (transformers' ordering)."""
    grouped = batches_of(LengthGroupedBatches(LENGTHS, 8, seed=0))
    means = [sum(LENGTHS[i] for i in b) / len(b) for b in grouped]
    half = len(means) // 2
    first, second = sum(means[:half]) / half, sum(means[half:]) / (len(means) - half)
    assert abs(first - second) < 0.2 * (sum(means) / len(means))
    ascending = sum(a <= b for a, b in itertools.pairwise(means))
    assert 0.2 < ascending / (len(means) - 1) < 0.8


def test_only_the_last_batch_is_short() -> None:
    n = 8 * WINDOW_BATCHES + 13  # a full window and a partial one
    grouped = batches_of(LengthGroupedBatches([i % 7 for i in range(n)], 8, seed=0))
    assert [len(b) for b in grouped[:-1]] == [8] * (len(grouped) - 1)
    assert len(grouped[-1]) == n % 8


def test_bad_batch_size_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size 0"):
        LengthGroupedBatches([1, 2], 0, seed=0)
