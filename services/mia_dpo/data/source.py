"""Reading LLaVA-format source data: the index file, its samples, and their images.

Pure functions over bytes and dicts; the caller fetches bytes from wherever they live.
Anything wrong with one sample raises `SampleError(reason, detail)` so the stage can
count it under `reason` and move on; only a file that cannot be read at all is a
`UserError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import stat
import threading

from pydantic import BaseModel, ConfigDict

from mia_dpo.errors import SampleError, UserError

IMAGE_TAG = "<image>"
DEFAULT_MAX_TEXT_CHARS = 20_000

# Formats a LLaVA mix actually contains. Anything else (EPS would shell out to
# Ghostscript, for one) is refused before any plugin gets to parse it.
SAFE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_BOM = b"\xef\xbb\xbf"
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DRIVE = re.compile(r"^[A-Za-z]:")
# PIL reads LOAD_TRUNCATED_IMAGES as a module global at load() time, and any library
# may have set it to True. We force it off around our own loads; the lock keeps two
# threads from restoring each other's value in the wrong order.
_STRICT_LOAD = threading.Lock()


class SourceTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    question: str
    answer: str


class SourceSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    image: str
    source: str
    turns: list[SourceTurn]
    line: int


# --- index file ---------------------------------------------------------------------

Records = list[tuple[int, object]]  # (line, raw value)
Problems = list[tuple[int, str, str]]  # (line, reason, detail)


def read_index(data: bytes, name: str) -> tuple[Records, Problems]:
    """Parse a JSON list or JSONL index into (records, problems), both keyed by line
    (the 1-based position of an item in a JSON list)."""
    data = data.removeprefix(_BOM)
    head = data.lstrip()
    if not head:
        raise UserError(f"{name}: the file is empty")
    if head.startswith(b"["):
        records, problems = _read_json_list(data, name), []
        unit = "sample"
    else:
        records, problems = _read_jsonl(data, name)
        unit = "line"
    if any(len(m[0]) == 6 for m in _SURROGATE_ESCAPES.finditer(data)):  # rare: then look closer
        records, bad_text = _split_unencodable(records, name, unit)
        problems = sorted(problems + bad_text)
    return records, problems


class _Unparseable(ValueError):
    """Valid JSON syntax that Python's parser still refuses."""


def _loads(text: str) -> object:
    """json.loads; the ways it fails besides JSONDecodeError become _Unparseable."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _Unparseable("nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError as e:  # a number past Python's int-string digit limit
        raise _Unparseable(str(e).split(";")[0]) from None


def _read_json_list(data: bytes, name: str) -> Records:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lines = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}: not UTF-8 at line {lines} (byte {e.start})") from None
    try:
        value = _loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except _Unparseable as e:
        raise UserError(f"{name}: invalid JSON: {e}") from None
    return [(i + 1, item) for i, item in enumerate(value)]  # valid JSON after '[' is a list


def _read_jsonl(data: bytes, name: str) -> tuple[Records, Problems]:
    records: Records = []
    problems: Problems = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append((n, "not_utf8", f"{name}: line {n}: not UTF-8 at byte {e.start}"))
            continue
        try:
            records.append((n, _loads(text)))
        except json.JSONDecodeError as e:
            detail = f"{name}: line {n}: invalid JSON at column {e.colno}: {e.msg}"
            problems.append((n, "invalid_json", detail))
        except _Unparseable as e:
            problems.append((n, "invalid_json", f"{name}: line {n}: invalid JSON: {e}"))
    if not records and problems:
        # A pretty-printed single object fails line by line; say what it really is.
        try:
            whole = _loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            whole = None
        if whole is not None and not isinstance(whole, list):
            raise UserError(
                f"{name}: top-level JSON value is a {type(whole).__name__}, "
                "expected a list of samples or one sample per line (JSONL)"
            )
        # Nothing parses (UTF-16, a binary file, not JSON at all): not an index.
        _, _, first = problems[0]
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise UserError(
            f"{name}: not a JSON list or JSONL index: no line of it parses "
            f"({len(problems)} tried; {first.removeprefix(name + ': ')})"
            + ("; it looks like UTF-16: save it as UTF-8" if utf16 else "")
        )
    return records, problems


# \uD800-\uDFFF escapes: JSON allows them unpaired, but such a string is not Unicode
# text and cannot be written out as UTF-8 again (the plan would fail writing its shard).
# The record is dropped with its line. Only an unpaired escape in the raw bytes (or an
# escaped backslash before one) makes read_index look at every string; pairs (emoji) don't.
# A pair matches as 12 bytes (the first alternative); a 6-byte match is unpaired.
_SURROGATE_ESCAPES = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|\\u[dD][89a-fA-F][0-9a-fA-F]{2}"
)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _split_unencodable(records: Records, name: str, unit: str) -> tuple[Records, Problems]:
    """Move records holding an unpaired surrogate to problems (reason `not_utf8`)."""
    kept: Records = []
    problems: Problems = []
    for line, value in records:
        field = _surrogate_field(value)
        if field is None:
            kept.append((line, value))
        else:
            detail = (
                f"{name}: {unit} {line}: {field} holds an unpaired UTF-16 surrogate escape "
                "(not Unicode text, cannot be UTF-8)"
            )
            problems.append((line, "not_utf8", detail))
    return kept, problems


def _surrogate_field(value: object) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, else None."""
    stack: list[tuple[str, object]] = [("record", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path
        elif isinstance(v, dict):
            for k in v:
                if _SURROGATE.search(k):
                    return f"a key of {path}"
            # Pushed in reverse, so the first bad field in the record is the one named.
            stack.extend((k if path == "record" else f"{path}.{k}", v[k]) for k in reversed(v))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", v[i]) for i in reversed(range(len(v))))
    return None


# --- one sample ---------------------------------------------------------------------


def parse_sample(
    raw: object, line: int, *, max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
) -> SourceSample:
    """Validate one LLaVA record; raises SampleError naming the bad field."""
    if not isinstance(raw, dict):
        raise SampleError("not_an_object", f"sample is a {type(raw).__name__}, not an object")

    sample_id = raw.get("id")
    if isinstance(sample_id, int) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    if not isinstance(sample_id, str) or not sample_id.strip():
        raise SampleError("missing_id", f"field 'id' must be a non-empty string, got {sample_id!r}")

    image = raw.get("image")
    if image is None or image == "":
        raise SampleError("missing_image", "field 'image' is missing or empty")
    if isinstance(image, list):
        n = len(image)
        raise SampleError("multi_image_source", f"field 'image' lists {n} images, not one")
    if not isinstance(image, str):
        kind = type(image).__name__
        raise SampleError("bad_image_field", f"field 'image' must be a string, got {kind}")

    turns = _parse_turns(raw.get("conversations"))
    if IMAGE_TAG not in turns[0].question:
        raise SampleError("no_image_tag", f"conversations[0].value has no {IMAGE_TAG} tag")
    tags = sum(t.question.count(IMAGE_TAG) + t.answer.count(IMAGE_TAG) for t in turns)
    if tags > 1:
        detail = f"conversations hold {tags} {IMAGE_TAG} tags, not one"
        raise SampleError("too_many_image_tags", detail)
    for i, t in enumerate(turns):
        for offset, text in ((0, t.question), (1, t.answer)):
            if len(text) > max_text_chars:
                raise SampleError(
                    "prompt_too_long",
                    f"conversations[{2 * i + offset}].value has {len(text)} characters "
                    f"(limit {max_text_chars})",
                )

    source = _source_of(raw.get("source"), image)
    return SourceSample(id=sample_id, image=image, source=source, turns=turns, line=line)


def _parse_turns(conv: object) -> list[SourceTurn]:
    if conv is None:
        raise SampleError("missing_conversations", "field 'conversations' is missing")
    if not isinstance(conv, list) or not conv:
        raise SampleError("bad_conversations", "field 'conversations' must be a non-empty list")
    texts: list[str] = []
    for i, msg in enumerate(conv):
        if not isinstance(msg, dict):
            raise SampleError("bad_conversations", f"conversations[{i}] is not an object")
        speaker, value = msg.get("from"), msg.get("value")
        expected = "human" if i % 2 == 0 else "gpt"
        if speaker != expected:
            raise SampleError(
                "bad_conversations",
                f"conversations[{i}].from is {speaker!r}, expected {expected!r} "
                "(turns alternate human then gpt; 'user'/'assistant' are not accepted)",
            )
        if not isinstance(value, str):
            raise SampleError("bad_conversations", f"conversations[{i}].value is not a string")
        texts.append(value)
    # A final question with no answer gives nothing to prefer; drop it.
    del texts[len(texts) - len(texts) % 2 :]
    pairs = [SourceTurn(question=q, answer=a) for q, a in zip(texts[::2], texts[1::2], strict=True)]
    if not pairs:
        raise SampleError("bad_conversations", "field 'conversations' has no answered turn")
    return pairs


def _source_of(field: object, image: str) -> str:
    if isinstance(field, str) and field.strip():
        return field
    folder, sep, _ = posixpath.normpath(image).partition("/")
    if sep and folder not in ("", ".", ".."):
        return folder
    return "default"


# --- image paths --------------------------------------------------------------------


def safe_relative_path(rel: str) -> str:
    """Normalise a data-supplied path, refusing anything that could leave the image root."""
    if not rel:
        raise SampleError("unsafe_path", "field 'image' is an empty path")
    if "\0" in rel:
        raise SampleError("unsafe_path", f"field 'image' contains a NUL byte: {rel!r}")
    # Backslashes catch C:\x and \\server, and are never right in a posix relative path.
    if "\\" in rel:
        raise SampleError("unsafe_path", f"field 'image' contains a backslash: {rel!r}")
    if rel.startswith("/") or _DRIVE.match(rel):
        raise SampleError("unsafe_path", f"field 'image' is an absolute path: {rel!r}")
    norm = posixpath.normpath(rel)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise SampleError("unsafe_path", f"field 'image' climbs out of the image root: {rel!r}")
    return norm


def resolve_image(root: str, rel: str) -> str:
    """Join an image root (local dir or s3://bucket/prefix) and a sample's image path."""
    safe = safe_relative_path(rel)
    if root.startswith("s3://"):
        if not root[len("s3://") :].split("/", 1)[0]:
            raise UserError(f"image root {root!r} names no bucket")
        return f"{root.rstrip('/')}/{safe}"
    base = os.path.realpath(root)
    path = os.path.join(base, safe)
    # A symlink inside the root may still point anywhere; judge where it lands.
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise SampleError("unsafe_path", f"field 'image' {rel!r} resolves outside the image root")
    # Opening a FIFO blocks until someone writes to it, a device may never end: read
    # only regular files (a missing file or a folder is left to the reader: not found).
    with contextlib.suppress(OSError):
        mode = os.stat(real).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise SampleError("image_unreadable", f"{rel}: not a regular file, not read")
    return path
