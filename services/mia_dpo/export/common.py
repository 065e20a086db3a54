"""What every pairs export shares: reading a finished run's pairs, copying their images
out of the store into the export folder, and writing that folder all at once.

The pairs come from `runs/R/select/pairs.jsonl`, validated as `Pair` records: the one
file with every field of a pair (the TRL file is derived from it). Image URIs in a
pair are local paths or `s3://` URIs; `BlobReader` resolves both, so an export reads
exactly what the train stage would.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mia_dpo import __version__
from mia_dpo.data.images import SAFE_FORMATS, BlobSource
from mia_dpo.errors import NotFound, UserError
from mia_dpo.prompts import IMAGE_TAG
from mia_dpo.records import FORMATS, Pair
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import Store

MANIFEST = "export.json"
IMAGES_DIR = "images"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}  # else lower


def need_package(module: str, what: str) -> None:
    """The pairs export runs on the light install (no torch); `datasets` (hf) and
    `huggingface_hub` (push) come with the `model` extra or on their own. Checked before
    any work, so a missing one never costs an export."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        found = False
    if not found:
        raise UserError(f"{what} needs the {module} package: pip install {module}")


class ExportManifest(BaseModel):
    """`export.json`: what a folder holds and where it came from. Its presence also
    marks the folder as ours, the only kind `--force` may replace."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(default="mia-dpo", description="Written by mia-dpo export.")
    version: str = Field(default=__version__, description="mia-dpo version that wrote it.")
    run_id: str
    format: str = Field(description="trl, llamafactory or hf.")
    pairs: int = Field(description="Rows written (preference pairs, SFT-only rows included).")
    sft_only: int = Field(description="Rows whose rejected answer equals the chosen one.")
    per_format: dict[str, int] = Field(description="Rows per augmentation format.")
    images: int = Field(description="Distinct image files (deduplicated by content).")
    files: list[str] = Field(description="The data files, relative to the folder.")


def load_run_pairs(store: Store, run_id: str) -> list[Pair]:
    """The pairs of a run whose select stage has finished; UserError otherwise."""
    if not store.exists(layout.config_key(run_id)):
        raise UserError(f"run {run_id!r}: not found in the store {store.uri('runs')}")
    if not store.exists(layout.stage_done_key(run_id, "select")):
        raise UserError(
            f"run {run_id!r}: the select stage has not finished, so there are no pairs to "
            "export yet (see mia-dpo status)"
        )
    key = layout.pairs_key(run_id)
    try:
        lines = store.get_jsonl(key)
    except NotFound:
        raise UserError(f"run {run_id!r}: {store.uri(key)} is missing") from None
    pairs = []
    for n, line in enumerate(lines, 1):
        try:
            pair = Pair.model_validate_json(line)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "record"
            raise UserError(f"{store.uri(key)} line {n}: {where}: {err['msg']}") from None
        if (tags := pair.prompt.count(IMAGE_TAG)) != len(pair.image):
            raise UserError(
                f"{store.uri(key)} line {n}: pair {pair.id}: prompt has {tags} {IMAGE_TAG} "
                f"tags for {len(pair.image)} images"
            )
        pairs.append(pair)
    return pairs


class ImageCopier:
    """Copies each image a pair names into `folder/images/`, once per distinct content:
    the same source picture drawn as a distractor by many samples becomes one file.
    Files are named by content hash, so the names are stable across exports."""

    def __init__(self, blobs: BlobSource, folder: Path) -> None:
        self.blobs, self.folder = blobs, folder
        self._by_uri: dict[str, str] = {}
        self.files: set[str] = set()

    def copy(self, pair_id: str, uri: str) -> str:
        """The image's path relative to the folder (posix)."""
        if (done := self._by_uri.get(uri)) is not None:
            return done
        try:
            data = self.blobs.read(uri)
        except NotFound:
            raise UserError(f"pair {pair_id}: image {uri} not found in the store") from None
        except OSError as e:
            raise UserError(f"pair {pair_id}: image {uri}: cannot read: {e}") from None
        digest = hashlib.sha256(data).hexdigest()[:24]
        rel = f"{IMAGES_DIR}/{digest}.{_extension(pair_id, uri, data)}"
        if rel not in self.files:
            path = self.folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self.files.add(rel)
        self._by_uri[uri] = rel
        return rel

    def copy_all(self, pair: Pair) -> list[str]:
        return [self.copy(pair.id, uri) for uri in pair.image]


def _extension(pair_id: str, uri: str, data: bytes) -> str:
    """The file extension of the image's actual format (a URI's own may be missing)."""
    try:
        with Image.open(io.BytesIO(data), formats=SAFE_FORMATS) as im:
            fmt = im.format or ""
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"pair {pair_id}: image {uri}: not a readable image: {e}") from None
    return _EXTENSIONS.get(fmt, fmt.lower() or "img")


def manifest_for(
    run_id: str, fmt: str, pairs: list[Pair], images: int, files: list[str]
) -> ExportManifest:
    counts = Counter(p.format for p in pairs)
    return ExportManifest(
        run_id=run_id, format=fmt, pairs=len(pairs), sft_only=sum(p.sft_only for p in pairs),
        per_format={f: counts.get(f, 0) for f in FORMATS}, images=images, files=files,
    )  # fmt: skip


def check_out(out: Path, force: bool) -> None:
    """An export never mixes with other files: --out must be new or empty, or, with
    --force, an earlier export (its export.json says so) that is then replaced."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"--out {out}: not empty; pass --force to replace an earlier export")
    if not (out / MANIFEST).is_file():
        raise UserError(
            f"--out {out}: not empty and not an earlier mia-dpo export (no {MANIFEST}); "
            "--force only replaces an export, choose an empty folder"
        )


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A scratch folder next to `out` that becomes `out` only when the body succeeds:
    an export that fails half-way (a missing image) leaves `out` as it was."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():  # empty, or an earlier export that check_out let --force replace
        shutil.rmtree(out)
    tmp.rename(out)
