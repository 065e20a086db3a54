"""`mia-dpo demo`: the whole pipeline on one machine with nothing but Python.

Synthetic source data (coloured shapes), the tiny LLaVA base model (cached by its
recipe), then every stage on the embedded default with the packaged `demo.yaml`
(calibrated selection, label balance), then the HTML report, the contact sheet, the
before / after table and the headline paired delta. Everything lands in one folder;
rerunning resumes (finished stages are skipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from mia_dpo.cli.common import connections, print_outcomes, run_checks
from mia_dpo.controller import Controller
from mia_dpo.demo.config import RUN_ID, demo_config
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.report import contact_sheet
from mia_dpo.report_html import write_report
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader
from mia_dpo.stages import get_stage
from mia_dpo.status import format_status, run_status


def run_demo(folder: Path, n: int, seed: int, quiet: bool, out: TextIO) -> int:
    from mia_dpo.demo.base_model import ensure_base_model  # torch: only when it runs

    data = write_synthetic(folder / "source", n, seed=seed)
    print(f"{n} synthetic samples -> {data}", file=out)
    base = ensure_base_model(folder / "base", progress=not quiet, seed=seed)
    print(f"base model -> {base}", file=out)
    cfg = demo_config(folder)
    store, queue = connections(cfg)
    controller = Controller(
        cfg, RUN_ID, store, queue, stages=get_stage, progress=not quiet, checks=run_checks(cfg)
    )
    outcomes = controller.run()
    print_outcomes(outcomes, out)
    report = write_report(store, BlobReader(cfg.store), RUN_ID, folder / "report.html")
    sheet = contact_sheet(store, cfg, RUN_ID, folder / "contact-sheet.png")
    print(f"report -> {report}\ncontact sheet -> {sheet}", file=out)
    print(format_status(run_status(store, None, RUN_ID)), file=out)
    print(store.get_text(layout.evaluate_key(RUN_ID, "report.md")), file=out)
    print(headline(store.get_json(layout.evaluate_key(RUN_ID, "report.json"))), file=out)
    return 0


def headline(report: dict) -> str:
    """The demo's answer in two lines: what training changed, with its paired interval."""
    lines = []
    for cell, label in (("multi_image", "multi-image"), ("single", "single-image")):
        ci = report.get("interval", {}).get("adapted", {}).get(cell)
        if ci:
            verdict = (
                "not told apart from noise" if ci["low"] <= 0 <= ci["high"] else "beyond noise"
            )
            lines.append(
                f"MIA-DPO vs base, {label} ({ci['n']} items): {ci['delta']:+.3f} "
                f"[95 % interval {ci['low']:+.3f}, {ci['high']:+.3f}], {verdict}"
            )
    return "\n".join(lines)
