"""Calibrated selection (calibration.py): AUC, the chosen layer and thresholds, computed
from hand-built shares whose answers are known, and the plot."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from mia_dpo.calibration import (
    Observation,
    calibrate,
    correctness,
    format_calibration,
    roc_auc,
)
from mia_dpo.calibration_plot import auc_plot_png
from mia_dpo.config import CalibrateConfig, RunConfig, ScoreConfig


def test_roc_auc_hand_computed() -> None:
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert roc_auc([0.5], [0.5]) == 0.5  # a tie counts one half
    # pairs: (0.6 > 0.4) (0.6 > 0.5) (0.3 < 0.4) (0.3 < 0.5) (0.5 = 0.5: 1/2) (0.5 > 0.4)
    assert roc_auc([0.6, 0.3, 0.5], [0.4, 0.5]) == pytest.approx(3.5 / 6)
    assert roc_auc([], [0.1]) is None


def test_correctness() -> None:
    assert correctness("Red.", "red") is True
    assert correctness("It is red", "red") is True  # a short ground truth found as words
    assert correctness("reddish", "red") is False
    assert correctness("blue", "red") is False
    long = "a man riding a brown horse along the beach at sunset"
    assert correctness("a dog", long) is None  # a long answer: cannot tell
    assert correctness(long.upper(), long) is True


def observations(seed: int = 0, n: int = 60, layers: int = 4, good: int = 1) -> list[Observation]:
    """Two-image sequences: at layer `good` right answers look at the target (share ~0.7)
    and wrong ones away (~0.3); every other layer is noise around 0.5."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        right = i % 2 == 0
        ratios = [rng.uniform(0.3, 0.7) for _ in range(layers)]
        ratios[good] = rng.uniform(0.6, 0.8) if right else rng.uniform(0.2, 0.4)
        out.append(Observation(format="sequence", n_images=2, right=right, ratios=ratios))
    return out


def test_the_separating_layer_is_chosen_and_thresholds_are_right_answers_quantiles() -> None:
    obs = observations()
    cal = calibrate(obs, 4, CalibrateConfig(quantile=0.1), ScoreConfig())
    assert cal.layers == [1] and cal.layer_from == "best_auc"
    assert cal.auc == 1.0 and cal.separates
    assert all(a is not None and a < 0.85 for i, a in enumerate(cal.auc_by_layer) if i != 1)
    right = [o.ratios[1] for o in obs if o.right]
    assert cal.threshold("sequence", 2) == pytest.approx(np.quantile(right, 0.1), abs=1e-6)
    # sequence 3 has no answers: the format's right answers on the chance scale (x n / 3)
    seq3 = next(c for c in cal.cells if (c.format, c.n_images) == ("sequence", 3))
    assert seq3.threshold_from == "format"
    assert seq3.threshold == pytest.approx(np.quantile([2 * r for r in right], 0.1) / 3, abs=1e-6)
    # no grid or pic-in-pic answer at all: the paper's values stay
    seq, grid, pip = cal.tables()
    assert set(seq) == {2, 3, 4, 5} and grid == ScoreConfig().grid_thresholds and pip == 0.8
    assert (cal.n_right, cal.n_wrong, cal.n_answers) == (30, 30, 60)


def test_a_fixed_layer_is_kept_and_the_best_still_reported() -> None:
    cal = calibrate(observations(), 4, CalibrateConfig(), ScoreConfig(), fixed_layer=2)
    assert cal.layers == [2] and cal.layer_from == "config"
    assert cal.best_layers == [1] and cal.best_auc == 1.0
    assert "best would be layer 1" in cal.summary()


def two_formats(seed: int = 0) -> list[Observation]:
    """Sequences separate at layer 1 only; grids (twice as many) at layer 3 only, and
    less cleanly (AUC ~0.7); layers 0 and 2 are noise."""
    obs = observations(seed, n=60, good=1)
    rng = random.Random(seed + 1)
    for i in range(120):
        right = i % 2 == 0
        r = [rng.uniform(0.05, 0.45) for _ in range(4)]
        r[3] = rng.uniform(0.15, 0.45) if right else rng.uniform(0.05, 0.35)
        obs.append(Observation(format="grid", n_images=4, right=right, ratios=r))
    return obs


def test_per_format_each_format_reads_its_own_layer() -> None:
    obs = two_formats()
    run = calibrate(obs, 4, CalibrateConfig(), ScoreConfig())
    per = calibrate(obs, 4, CalibrateConfig(layer_per="format"), ScoreConfig())
    assert run.format_layers == {} and run.layers_for("sequence") == run.layers == [3]
    assert per.layers == [3]  # the pooled choice, kept for formats not measured
    assert per.format_layers == {"sequence": [1], "grid": [3]}
    assert per.layers_for("sequence") == [1] and per.layers_for("pic_in_pic") == [3]
    assert per.format_auc["sequence"] == 1.0 and 0.6 < per.format_auc["grid"] < 0.85
    # pooled over cells, each at its own format's layer, the AUC beats one layer for all
    assert per.auc > run.auc
    # thresholds: each cell's right answers at its format's layer
    seq_right = [o.ratios[1] for o in obs if o.right and o.format == "sequence"]
    grid_right = [o.ratios[3] for o in obs if o.right and o.format == "grid"]
    assert per.threshold("sequence", 2) == pytest.approx(np.median(seq_right), abs=1e-6)
    assert per.threshold("grid", 4) == pytest.approx(np.median(grid_right), abs=1e-6)
    assert run.threshold("sequence", 2) != per.threshold("sequence", 2)
    assert "per format: sequence 1 (AUC 1.000), grid 3" in per.summary()
    assert "thresholds at layer sequence 1, grid 3" in format_calibration(per)
    # separation per format: sequence alone clears a floor no single layer reaches
    strict = CalibrateConfig(auc_floor=0.9)
    assert not calibrate(obs, 4, strict, ScoreConfig()).separates  # best layer: 0.706
    per_strict = calibrate(obs, 4, strict.model_copy(update={"layer_per": "format"}), ScoreConfig())
    assert per_strict.separates and "WARNING" not in per_strict.summary()
    assert per_strict.summary().endswith("; near chance (AUC below 0.90): grid")
    # a fixed score.layer wins: no per-format choice
    fixed = calibrate(obs, 4, CalibrateConfig(layer_per="format"), ScoreConfig(), fixed_layer=2)
    assert fixed.format_layers == {} and fixed.layers == [2]
    img = Image.open(io.BytesIO(auc_plot_png(per)))
    assert img.format == "PNG"
    # the sequence band is marked in the sequence colour (blue) at layer 1's x
    pixels = np.asarray(img.convert("RGB"))
    x1 = 48 + (560 - 130 - 48) // 3
    assert ((pixels[24:272, x1 : x1 + 5] == (31, 119, 180)).all(axis=-1)).sum() > 20


def test_bands_average_adjacent_layers() -> None:
    # half the signal at layer 1 and half at layer 2: the band 1-2 separates best
    rng = random.Random(3)
    obs = []
    for i in range(80):
        right = i % 2 == 0
        r = [rng.uniform(0.3, 0.7) for _ in range(4)]
        shift = 0.12 if right else -0.12
        r[1], r[2] = r[1] + shift, r[2] + shift
        obs.append(Observation(format="grid", n_images=4, right=right, ratios=r))
    single = calibrate(obs, 4, CalibrateConfig(max_band=1), ScoreConfig())
    band = calibrate(obs, 4, CalibrateConfig(max_band=2), ScoreConfig())
    assert band.layers == [1, 2]
    assert band.auc > max(a for a in single.auc_by_layer if a is not None)
    assert set(band.band_auc) == {"0", "1", "2", "3", "0-1", "1-2", "2-3"}


def test_no_signal_is_said_loudly() -> None:
    rng = random.Random(1)
    obs = [Observation(format="sequence", n_images=2, right=i % 2 == 0,
                       ratios=[rng.random() for _ in range(3)]) for i in range(200)]  # fmt: skip
    cal = calibrate(obs, 3, CalibrateConfig(auc_floor=0.7), ScoreConfig())
    assert not cal.separates
    assert "no better than chance" in cal.summary()
    assert "no better than chance" in format_calibration(cal)


def test_too_few_answers_per_cell_measure_nothing() -> None:
    obs = observations(n=10)  # 5 right, 5 wrong < 8 per cell
    cal = calibrate(obs, 4, CalibrateConfig(), ScoreConfig())
    assert cal.auc_by_layer == [None] * 4 and cal.best_auc is None and not cal.separates
    assert cal.layers == [2]  # nothing measured: the paper's middle layer
    assert "too few" in cal.summary()


def test_plot_is_a_png() -> None:
    cal = calibrate(observations(), 4, CalibrateConfig(), ScoreConfig())
    img = Image.open(io.BytesIO(auc_plot_png(cal)))
    assert img.format == "PNG" and img.size == (560, 320)
    # the pooled curve is drawn in black somewhere inside the axes
    pixels = np.asarray(img.convert("RGB"))
    assert ((pixels[20:280, 50:430] == 20).all(axis=-1)).sum() > 50


def test_config_adds_calibrate_before_score_when_asked() -> None:
    assert "calibrate" not in RunConfig().stages
    cfg = RunConfig(score={"layer": "auto"})
    assert cfg.stages.index("calibrate") == cfg.stages.index("score") - 1
    cfg = RunConfig(score={"thresholds": "calibrated"}, stages=["score", "select"])
    assert cfg.stages == ["calibrate", "score", "select"]
    with pytest.raises(ValueError, match="layer"):
        ScoreConfig(layer=-1)


def test_report_and_status_show_the_calibration(tmp_path) -> None:
    """The HTML report embeds the AUC plot and the table, and warns when nothing
    separates; status prints the one-line summary with the same warning."""
    from mia_dpo.report_html import _calibration_html
    from mia_dpo.runtime import layout
    from mia_dpo.runtime.store import LocalStore
    from mia_dpo.status import RunStatus, format_status

    store = LocalStore(tmp_path)
    assert _calibration_html(store, "r") == []  # no calibration: no section
    good = calibrate(observations(), 4, CalibrateConfig(), ScoreConfig())
    noise = calibrate(observations(good=-1 % 4, n=40), 4, CalibrateConfig(), ScoreConfig())
    noise = noise.model_copy(update={"best_auc": 0.52, "separates": False})
    for cal, warned in ((good, False), (noise, True)):
        store.put_text(layout.calibration_key("r"), cal.model_dump_json())
        store.put_bytes(layout.calibration_key("r", "auc_by_layer.png"), auc_plot_png(cal))
        page = "".join(_calibration_html(store, "r"))
        assert 'src="data:image/png;base64,iVBOR' in page  # the PNG, embedded
        assert "L0" in page and "thresholds at layer" in page
        assert ("no better than chance" in page) is warned
        line = format_status(RunStatus(run_id="r", n_records=1, plan_dropped={}, stages=[],
                                       calibration=cal.summary()))  # fmt: skip
        assert f"calibration: layer {cal.layers[0]}" in line
        assert ("WARNING" in line) is warned
