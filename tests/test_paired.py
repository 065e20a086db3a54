"""Paired bootstrap intervals: the numbers every before / after claim is judged by."""

from __future__ import annotations

import pytest

from mia_dpo.paired import mean_interval, paired_delta


def test_paired_delta_is_the_mean_per_item_difference() -> None:
    base = [True] * 6 + [False] * 4
    variant = [True] * 5 + [False] + [True] * 3 + [False]  # 1 lost, 3 gained
    got = paired_delta(base, variant)
    assert got.n == 10
    assert got.delta == pytest.approx(0.2)
    assert got.low < 0.2 < got.high
    assert got.low >= -1 and got.high <= 1


def test_identical_answers_give_a_zero_width_interval() -> None:
    same = [True, False, True, True]
    got = paired_delta(same, same)
    assert (got.delta, got.low, got.high) == (0.0, 0.0, 0.0)


def test_interval_narrows_with_more_items_and_is_reproducible() -> None:
    small = paired_delta([False] * 20, [True] * 5 + [False] * 15)
    large = paired_delta([False] * 2000, [True] * 500 + [False] * 1500)
    assert small.delta == large.delta == pytest.approx(0.25)
    assert large.high - large.low < (small.high - small.low) / 4
    assert paired_delta([False] * 20, [True] * 5 + [False] * 15) == small
    assert str(large).startswith("+0.250 [")


def test_pairing_removes_item_difficulty() -> None:
    # Every item the base gets right the variant gets right too, plus 10 more: a paired
    # interval excludes 0 although the two accuracies alone (0.5 vs 0.55) would not.
    base = [True] * 100 + [False] * 100
    variant = [True] * 110 + [False] * 90
    got = paired_delta(base, variant)
    assert got.low > 0


def test_mean_interval_over_seed_deltas() -> None:
    got = mean_interval([0.04, 0.06, 0.05])
    assert got.delta == pytest.approx(0.05)
    assert 0.04 <= got.low <= got.high <= 0.06


def test_unpaired_input_is_refused() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        paired_delta([True], [True, False])
    with pytest.raises(ValueError, match="no items"):
        paired_delta([], [])


def test_seed_noise_widens_the_interval() -> None:
    from mia_dpo.paired import seeds_paired_delta

    base = [[False] * 400] * 3
    steady = [[True] * 40 + [False] * 360] * 3  # +0.10 in every seed
    shaky = [  # +0.117 on average, but 0 .. +0.25 from seed to seed
        [True] * 100 + [False] * 300,
        [True] * 40 + [False] * 360,
        [True] * 0 + [False] * 400,
    ]
    a, b = seeds_paired_delta(base, steady), seeds_paired_delta(base, shaky)
    assert a.delta == pytest.approx(0.1) and b.delta == pytest.approx(140 / 1200)
    assert b.high - b.low > 3 * (a.high - a.low)
    one = seeds_paired_delta(base[:1], steady[:1])
    assert one == paired_delta(base[0], steady[0])
    with pytest.raises(ValueError, match="same number"):
        seeds_paired_delta(base, steady[:2])


def test_demo_headline_reads_the_report_intervals() -> None:
    from mia_dpo.cli.demo import headline

    d = paired_delta([False] * 100, [True] * 10 + [False] * 90).model_dump()
    z = paired_delta([True, False], [True, False]).model_dump()
    text = headline({"interval": {"adapted": {"multi_image": d, "single": z}}})
    multi, single = text.splitlines()
    assert multi.startswith("MIA-DPO vs base, multi-image (100 items): +0.100 [95 % interval +0.")
    assert multi.endswith("beyond noise")
    assert single.endswith("not told apart from noise")
    assert headline({"models": {"base": {}}}) == ""  # no adapter: nothing to claim
