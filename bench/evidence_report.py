"""The evidence study's table, its mechanical reading, and its plot (PIL: no matplotlib)."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, ImageDraw

CELLS = ("multi_image", "sequence", "grid", "pic_in_pic", "single")
LABELS = {"multi_image": "multi-image", "pic_in_pic": "pic-in-pic"}
GOAL_MULTI, GOAL_SINGLE = 0.05, -0.01  # issue 12's bar: +5 points multi, at most -1 single
# what each MIA-DPO variant must beat: random pairs and SFT on the same chosen answers;
# label balance against random pairs with the same SFT-only rows (the plain random pairs
# when that control did not run, as in studies before it existed)
CONTROLS = {
    "MIA-DPO calibrated": ("random (any answer)", "SFT on chosen"),
    "MIA-DPO calibrated + label balance": (
        "random (any answer) + label balance",
        "random (any answer)",
        "SFT on chosen",
    ),
}
# further head-to-head rows, outside the bar: the attention rule against random draws
# from the same wrong answers, the one comparison that isolates what attention adds
CONTRASTS = {
    "MIA-DPO calibrated": ("random_wrong",),
    "MIA-DPO calibrated + label balance": ("random_wrong + label balance",),
}


def _ci(d: dict[str, Any]) -> str:
    return f"{d['delta']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _reading(res: dict[str, Any]) -> list[str]:
    """What the figures say against the issue's bar, computed, not written by hand."""
    delta = res["delta"]
    out = []
    for name, controls in CONTROLS.items():
        if name not in delta:  # a study of fewer variants (bench/evidence.py --variants)
            continue
        refs = _controls(controls, delta)
        m, s = delta[name]["multi_image"], delta[name]["single"]
        beats = {
            ref: delta[name]["multi_image"]["low"] > delta[ref]["multi_image"]["high"]
            for ref in refs
            if ref in delta
        }
        missing = [ref for ref in refs if ref not in delta]
        met = m["delta"] >= GOAL_MULTI and s["delta"] >= GOAL_SINGLE and all(beats.values())
        out.append(
            f"- **{name}**: multi-image {_ci(m)}, single {_ci(s)}; its multi-image interval "
            + ", ".join(
                [f"{'lies above' if ok else 'overlaps'} {ref}'s" for ref, ok in beats.items()]
                + [f"not compared with {ref} (not run)" for ref in missing]
            )
            + f". The issue's bar (>= +{GOAL_MULTI:.2f} multi, >= {GOAL_SINGLE:+.2f} single, "
            "intervals apart from random and SFT): "
            + (
                "**not decided** (a comparison did not run)"
                if missing and met
                else f"**{'met' if met else 'not met'}**"
            )
            + "."
        )
        for ref in CONTRASTS.get(name, ()):
            if (d := delta.get(f"{name} - {ref}")) is not None:
                out.append(
                    f"  - what the attention rule adds over {ref} (the same wrong answers "
                    f"drawn at random): multi-image {_ci(d['multi_image'])}, single "
                    f"{_ci(d['single'])}."
                )
    return out


def render(res: dict[str, Any]) -> tuple[str, bytes]:
    n, base = res["n"], res["base"]
    head = "| variant | " + " | ".join(f"{LABELS.get(c, c)} (n {n[c]})" for c in CELLS) + " |"
    lines = [
        "# Evidence: every variant against the base, paired on one fixed benchmark",
        "",
        f"Training seeds {res['seeds']}; {res['n_train_source']} synthetic training samples; "
        f"benchmark seed {res['eval_seed']} (its own source, never trained on; items where a "
        f"distractor shares the target's answer left out). {res['minutes']:.1f} minutes.",
        "Each cell: mean change in accuracy against the base on the same items, and its 95 % "
        "bootstrap interval over items and training seeds.",
        "",
        head,
        "|---" * (len(CELLS) + 1) + "|",
        "| base (accuracy) | " + " | ".join(f"{base[c]:.3f}" for c in CELLS) + " |",
    ]
    for name, cells in res["delta"].items():
        lines.append(f"| {name} | " + " | ".join(_ci(cells[c]) for c in CELLS) + " |")
    lines += ["", "Per-seed multi-image deltas: " + "; ".join(
        f"{name} " + ", ".join(f"{v:+.3f}" for v in cells["multi_image"]["per_seed"])
        for name, cells in res["delta"].items() if " - " not in name
    ), ""]  # fmt: skip
    cal = [r for r in res["runs"] if "calibration" in r]
    if cal:
        lines += ["Calibration (the calibrated variants' shared calibrate stage), per seed:", ""]
        for r in cal:
            c = r["calibration"]
            by_layer = ", ".join("-" if a is None else f"{a:.3f}" for a in c["auc_by_layer"])
            auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}"
            per_format = "".join(
                f", {fmt} at layer {band} (AUC {_auc(c.get('format_auc', {}).get(fmt))})"
                for fmt, band in (c.get("format_layers") or {}).items()
            )
            lines.append(
                f"- seed {r['seed']}: layer {c['layers']}, AUC {auc}, AUC by layer [{by_layer}]"
                f"{per_format}, separates: {c['separates']}; thresholds "
                + ", ".join(f"{k} {v:.3f}" for k, v in r["thresholds"].items())
            )
        lines.append("")
    pairs = {r["variant"]: r["pairs"] for r in res["runs"] if r["seed"] == res["seeds"][0]}
    lines += [
        f"Pairs (seed {res['seeds'][0]}): " + ", ".join(f"{k} {v}" for k, v in pairs.items()),
        "",
        "## Reading",
        "",
        *_reading(res),
        "",
    ]
    return "\n".join(lines), _plot(res)


def _plot(res: dict[str, Any]) -> bytes:
    """Per variant against the base: multi-image (blue) and single (red) intervals."""
    names = [k for k in res["delta"] if " - " not in k]
    w, row, left, pad = 760, 34, 250, 30
    h = pad * 2 + row * len(names) + 20
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    vals = [v for k in names for c in ("multi_image", "single")
            for v in (res["delta"][k][c]["low"], res["delta"][k][c]["high"])]  # fmt: skip
    lo, hi = min(min(vals), -0.05), max(max(vals), 0.08)

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (w - left - pad)

    for tick in [t / 100 for t in range(int(lo * 100) - 1, int(hi * 100) + 2)]:
        if round(tick * 100) % 5 == 0 and lo <= tick <= hi:
            d.line([(x(tick), pad), (x(tick), h - pad)], fill=(235, 235, 235))
            d.text((x(tick) - 12, h - pad + 4), f"{tick:+.2f}", fill=(90, 90, 90))
    d.line([(x(0), pad), (x(0), h - pad)], fill=(0, 0, 0))
    d.line([(x(GOAL_MULTI), pad), (x(GOAL_MULTI), h - pad)], fill=(120, 160, 230))
    for i, name in enumerate(names):
        y = pad + row * i + row // 2
        d.text((8, y - 6), name, fill=(0, 0, 0))
        for c, dy, colour in (("multi_image", -5, (31, 90, 200)), ("single", 5, (200, 40, 40))):
            v = res["delta"][name][c]
            d.line([(x(v["low"]), y + dy), (x(v["high"]), y + dy)], fill=colour, width=3)
            d.ellipse([x(v["delta"]) - 3, y + dy - 3, x(v["delta"]) + 3, y + dy + 3], fill=colour)
    d.text((left, 8), "change vs base (blue: multi-image, red: single; 95 % interval; "
           "blue line: +0.05 goal)", fill=(0, 0, 0))  # fmt: skip
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _auc(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _controls(controls: tuple[str, ...], delta: dict[str, Any]) -> list[str]:
    """The random control (the balanced one when it ran) and SFT on chosen."""
    randoms = [c for c in controls if c.startswith("random")]
    random = next((c for c in randoms if c in delta), randoms[-1])
    return [random, *(c for c in controls if not c.startswith("random"))]
