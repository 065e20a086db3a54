"""Paired differences with bootstrap intervals: how a change is judged on one item set.

Two models answer the same items, so the question is the mean of per-item differences
(right = 1, wrong = 0), not the difference of two independent accuracies: the pairing
removes the items' own difficulty from the noise. The interval is a percentile
bootstrap over items, seeded, so a report is reproducible. numpy only (light images).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


class PairedDelta(BaseModel):
    """Mean per-item difference (variant - base) and its bootstrap interval."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int
    delta: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.delta:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_delta(
    base: Sequence[bool | float],
    variant: Sequence[bool | float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedDelta:
    """variant - base over the same items, with a percentile bootstrap interval."""
    if len(base) != len(variant):
        raise ValueError(f"paired samples differ in length: {len(base)} vs {len(variant)}")
    if not base:
        raise ValueError("no items to compare")
    d = np.asarray(variant, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDelta(n=len(d), delta=float(d.mean()), low=float(low), high=float(high))


def seeds_paired_delta(
    base: Sequence[Sequence[bool | float]],
    variant: Sequence[Sequence[bool | float]],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> PairedDelta:
    """variant - base on the same items, once per training seed (base[s], variant[s]).

    The interval resamples seeds and items together (the items drawn once per resample,
    shared by its seeds, since every seed answered the same items), so it holds both the
    benchmark's noise and the training seed's; with one seed it is `paired_delta`.
    """
    if len(base) != len(variant) or not base:
        raise ValueError(f"need the same number (>= 1) of seeds: {len(base)} vs {len(variant)}")
    if len(base) == 1:
        return paired_delta(
            base[0], variant[0], resamples=resamples, confidence=confidence, seed=seed
        )
    d = np.stack(
        [
            np.asarray(v, dtype=np.float64) - np.asarray(b, dtype=np.float64)
            for b, v in zip(base, variant, strict=True)
        ]
    )  # (seeds, items)
    if d.shape[1] == 0:
        raise ValueError("no items to compare")
    rng = np.random.default_rng(seed)
    n_seeds, n_items = d.shape
    means = np.empty(resamples)
    for r in range(resamples):
        s = rng.integers(0, n_seeds, size=n_seeds)
        i = rng.integers(0, n_items, size=n_items)
        means[r] = d[np.ix_(s, i)].mean()
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDelta(n=n_items, delta=float(d.mean()), low=float(low), high=float(high))


def mean_interval(
    values: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> PairedDelta:
    """The mean of per-seed deltas with a bootstrap interval over seeds (few values: wide)."""
    return paired_delta([0.0] * len(values), values, resamples=resamples, seed=seed)
