"""bench/evidence_report.py: the study's reading is computed from the figures, against the
issue's bar, for the full variant set and for a study of fewer variants (--variants)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from typing import Any

from PIL import Image

REPORT = Path(__file__).resolve().parents[1] / "bench" / "evidence_report.py"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("mia_dpo_bench_evidence_report", REPORT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(delta: float, half: float = 0.01) -> dict[str, Any]:
    return {"delta": delta, "low": delta - half, "high": delta + half, "per_seed": [delta]}


def _results(multi: dict[str, float]) -> dict[str, Any]:
    cells = ("multi_image", "sequence", "grid", "pic_in_pic", "single")
    return {
        "n": dict.fromkeys(cells, 300),
        "base": dict.fromkeys(cells, 0.4),
        "delta": {
            name: {c: _cell(v if c != "single" else 0.0) for c in cells}
            for name, v in multi.items()
        },
        "seeds": [0],
        "n_train_source": 2400,
        "eval_seed": 9001,
        "minutes": 1.0,
        "runs": [{"seed": 0, "variant": name, "pairs": 10} for name in multi],
    }


def test_bar_met_only_when_apart_from_random_and_sft() -> None:
    mod = _module()
    full = {
        "MIA-DPO calibrated": 0.08,
        "random (any answer)": 0.01,
        "SFT on chosen": 0.02,
        "MIA-DPO calibrated + label balance": 0.06,
    }
    md, png = mod.render(_results(full))
    assert "**MIA-DPO calibrated**: multi-image +0.080 [+0.070, +0.090]" in md
    assert md.count("**met**") == 2
    assert Image.open(io.BytesIO(png)).size[0] == 760
    # SFT as good as MIA-DPO: the intervals overlap, so the bar is not met
    md, _ = mod.render(_results({**full, "SFT on chosen": 0.075}))
    assert "overlaps SFT on chosen's" in md
    assert md.count("**not met**") == 2


def test_fewer_variants_say_what_was_not_compared() -> None:
    mod = _module()
    md, _ = mod.render(_results({"MIA-DPO calibrated": 0.08, "SFT on chosen": 0.0}))
    assert "lies above SFT on chosen's" in md
    assert "not compared with random (any answer) (not run)" in md
    assert "**not decided**" in md  # never "met" on a comparison that did not run
    assert "label balance**" not in md  # a variant that did not run has no reading


def test_contrast_with_random_wrong_is_read_when_it_ran() -> None:
    mod = _module()
    res = _results({"MIA-DPO calibrated": 0.03, "random_wrong": 0.01})
    res["delta"]["MIA-DPO calibrated - random_wrong"] = {
        c: _cell(0.02) for c in res["delta"]["MIA-DPO calibrated"]
    }
    md, _ = mod.render(res)
    assert "adds over random_wrong (the same wrong answers drawn at random): " in md
    assert "multi-image +0.020 [+0.010, +0.030]" in md
    assert "adds over random_wrong + label balance" not in md  # that variant did not run
