"""`mia-dpo export --adapter --out DIR [--merged]`: a run's LoRA adapter as a folder
that loads on its own with plain PEFT + transformers, ready for the hub:

    DIR/README.md              the model card, rendered afresh from the run's records
    DIR/adapter_config.json    base_model_name_or_path = the base's hub id when known
    DIR/adapter_model.safetensors, processor and tokenizer files (as trained; not the
        Trainer's training_args.bin pickle)
    DIR/merged/                with merged=True: the base with the adapter merged in

The merged weights are copied when the train stage made them (train.merge_adapter),
else built here: the base loaded with transformers, the adapter merged with PEFT's
merge_and_unload. The folder is written beside DIR and renamed into place at the end,
so a failed export leaves no half folder behind.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mia_dpo import model_card
from mia_dpo.config import RunConfig
from mia_dpo.errors import NotFound, UserError
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import Store

MERGED_DIR = "merged"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"export --out {out}: not empty; name a new or empty folder")


# The Trainer's own pickle of its arguments: the card holds the recipe, and a hub
# flags pickles as unsafe to load.
LEFT_OUT = {"training_args.bin"}


def _copy(store: Store, prefix: str, dest: Path) -> list[str]:
    names = [key[len(prefix) :] for key in store.list(prefix)]
    names = [name for name in names if name not in LEFT_OUT]
    for name in names:
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(prefix + name))
    return names


def _merge(cfg: RunConfig, adapter: Path, dest: Path) -> None:
    """The base model (model.path, loaded as trained: safetensors unless allow_pickle)
    with the adapter folded into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base_path = cfg.model.path
    try:
        base = AutoModelForImageTextToText.from_pretrained(
            base_path,
            revision=cfg.model.revision,
            dtype="auto",
            use_safetensors=None if cfg.model.allow_pickle else True,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"export --merged: cannot load the base model model.path {base_path!r}: {first}"
        ) from None
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(dest)
    AutoProcessor.from_pretrained(str(adapter)).save_pretrained(dest)


def export_adapter(cfg: RunConfig, run_id: str, store: Store, out: Path, merged: bool) -> Path:
    """Write the run's adapter (and with `merged` the merged model) to `out`; returns out."""
    out = Path(out)
    prefix = layout.train_prefix(run_id)
    adapter_prefix = layout.adapter_prefix(prefix)
    config_key = adapter_prefix + "adapter_config.json"
    if not store.exists(config_key):
        raise UserError(
            f"run {run_id!r} is not trained yet: {store.uri(config_key)} does not exist "
            "(run its train stage first)"
        )
    _check_out(out)
    metadata: dict[str, Any] | None
    try:
        metadata = store.get_json(layout.train_metadata_key(prefix))
    except NotFound:
        metadata = None
    # The export's config may name the base where training could not (a local path then):
    # its hub id wins over the one recorded at train time.
    hub_id = cfg.model.base_model_id() or (metadata or {}).get("base_model_hub_id")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _copy(store, adapter_prefix, staging)
        config = staging / "adapter_config.json"
        config.write_text(
            model_card.with_base_model(config.read_text(encoding="utf-8"), hub_id),
            encoding="utf-8",
        )
        if metadata is not None:
            # Fresh: the evaluation may have run, or the hub id become known, since training.
            meta = metadata | {"base_model_hub_id": hub_id}
            records = model_card.read_records(store, run_id, prefix, meta)
            card = model_card.render_card(records)
            (staging / model_card.CARD_NAME).write_text(card, encoding="utf-8")
        if merged:
            stored = layout.merged_prefix(prefix)
            if not _copy(store, stored, staging / MERGED_DIR):
                _merge(cfg, staging, staging / MERGED_DIR)
        with contextlib.suppress(FileNotFoundError):
            out.rmdir()  # empty (checked above): the staged folder takes its place
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
