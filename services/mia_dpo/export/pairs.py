"""`mia-dpo export --format F`: a run's pairs as a folder another trainer uses as is.

Formats: `trl` (JSONL for TRL's DPOTrainer), `llamafactory` (sharegpt preference data and
its dataset_info.json entry), `hf` (a `datasets` dataset saved to disk). Each folder is
self-contained: images copied out of the store, deduplicated, referenced by relative
path; a README.md dataset card and export.json (the manifest) beside them. Nothing
here needs torch; `datasets` only for `hf`. docs/export.md is the user's page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mia_dpo.errors import NotFound, UserError
from mia_dpo.export import card, common, hf, llamafactory, trl
from mia_dpo.export.common import MANIFEST, ExportManifest
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import BlobReader, Store

EXPORT_FORMATS = ("trl", "llamafactory", "hf")


def check_format(fmt: str) -> str:
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt!r}: unknown; one of {', '.join(EXPORT_FORMATS)}")
    return fmt


def _source_facts(store: Store, run_id: str) -> dict[str, Any]:
    """A few facts of the run for the card, read leniently from its stored config."""
    try:
        raw = store.get_json(layout.config_key(run_id))
    except (NotFound, ValueError):
        return {}
    model = raw.get("model") or {}
    select = raw.get("select") or {}
    return {
        "base model": model.get("hub_id") or model.get("path"),
        "selection strategy": select.get("strategy"),
        "seed": raw.get("seed"),
    }


def export_pairs(
    blobs: BlobReader, store: Store, run_id: str, out: Path, fmt: str,
    *, force: bool = False, license: str = "other",
) -> ExportManifest:  # fmt: skip
    """Write the run's pairs to `out` in `fmt`; `out` appears only once complete."""
    check_format(fmt)
    common.check_out(out, force)
    pairs = common.load_run_pairs(store, run_id)
    with common.staged(out) as tmp:
        copier = common.ImageCopier(blobs, tmp)
        name = ""
        if fmt == "trl":
            files, glob = trl.write(pairs, copier, tmp), trl.DATA_FILE
        elif fmt == "llamafactory":
            files, glob = llamafactory.write(pairs, copier, tmp, run_id), llamafactory.DATA_FILE
            name = llamafactory.dataset_name(run_id)
        else:
            files, glob = hf.write(pairs, copier, tmp), hf.ARROW_GLOB
        manifest = common.manifest_for(run_id, fmt, pairs, len(copier.files), files)
        text = card.render(
            manifest, license=license, data_glob=glob, name=name,
            source=_source_facts(store, run_id),
        )  # fmt: skip
        (tmp / "README.md").write_text(text, encoding="utf-8")
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return manifest
