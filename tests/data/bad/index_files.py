"""The index files: the records as a JSON list and as JSONL (with lines that are not
JSON between them), and whole index files that must stop the command with one line."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.data.bad.images import png
from tests.data.bad.manifest import Case, Manifest
from tests.data.bad.samples import Record, ok

PLAN_REASONS = ("invalid_json", "not_utf8")  # counted by the plan, by line


def _case(raw: object, line: int, case: str, expect: str, detail: str | None) -> Case:
    if expect in PLAN_REASONS:
        return Case(f"line-{line}", line, case, expect, detail, where="plan")
    return Case(_label(raw, line), line, case, expect, detail)


def _label(raw: object, line: int) -> str:
    """How the augment stage names a record in its outputs."""
    sid = raw.get("id") if isinstance(raw, dict) else None
    if isinstance(sid, (str, int)) and not isinstance(sid, bool) and str(sid):
        return str(sid)
    return f"line-{line}"


def _dumps(raw: object) -> str:
    # ensure_ascii keeps the lone surrogate as a \ud800 escape (it cannot be UTF-8).
    return json.dumps(raw, ensure_ascii=True)


# Lines of the JSONL that are not JSON values: (line text or bytes, case, reason, detail).
_BAD_LINES: list[tuple[bytes, str, str, str]] = [
    (b'{"id": "cut", "image": "coco/ok-0.png", "conver', "line cut short", "invalid_json",
     "invalid JSON"),
    (b"{'id': 'single-quotes'}", "single quotes", "invalid_json", "invalid JSON"),
    (b'{"id": "trailing-comma",}', "trailing comma", "invalid_json", "invalid JSON"),
    (b"not json at all", "plain text", "invalid_json", "invalid JSON"),
    (b'{"id": "caf\xe9", "image": "coco/ok-0.png"}', "Latin-1 byte", "not_utf8", "not UTF-8"),
    (b"\xff\xfe{\x00}\x00", "UTF-16 bytes", "not_utf8", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested 100000 levels deep", "invalid_json",
     "nested too deeply"),
    (b'{"id": ' + b"9" * 5000 + b"}", "a 5000-digit number", "invalid_json", "digits"),
]  # fmt: skip


def write_indexes(out: Path, records: list[Record], m: Manifest) -> None:
    # JSON list: line = 1-based position in the list.
    cases = []
    items = []
    for n, (raw, case, expect, detail) in enumerate(records, start=1):
        items.append(_dumps(raw))
        cases.append(_case(raw, n, case, expect, detail))
    (out / "data.json").write_text("[\n" + ",\n".join(items) + "\n]\n", encoding="utf-8")
    m.indexes["data.json"] = cases
    m.cases["data.json"] = "JSON list: valid samples mixed with every bad record"

    # JSONL: the same records, with the unparseable lines and blank lines between them.
    lines: list[bytes] = []
    cases = []
    bad_every = max(1, len(records) // (len(_BAD_LINES) + 1))
    bad = list(_BAD_LINES)
    for i, (raw, case, expect, detail) in enumerate(records):
        if i and i % bad_every == 0 and bad:
            text, bcase, reason, bdetail = bad.pop(0)
            lines.append(text)
            n = len(lines)
            cases.append(Case(f"line-{n}", n, bcase, reason, bdetail, where="plan"))
            lines.append(b"   ")  # blank lines are skipped, not counted
        lines.append(_dumps(raw).encode())
        n = len(lines)
        cases.append(_case(raw, n, case, expect, detail))
    for text, bcase, reason, bdetail in bad:
        lines.append(text)
        n = len(lines)
        cases.append(Case(f"line-{n}", n, bcase, reason, bdetail, where="plan"))
    (out / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    m.indexes["data.jsonl"] = cases
    m.cases["data.jsonl"] = "JSONL: the same records plus malformed and non-UTF-8 lines"


def write_bad_indexes(out: Path, m: Manifest) -> None:
    folder = out / "bad-index"
    folder.mkdir()
    sample = json.dumps([ok("a", "coco/ok-0.png")])
    image = png(Image.new("RGB", (8, 8), (1, 1, 1)))
    files: dict[str, tuple[bytes, str, str]] = {
        "utf16.json": (
            sample.encode("utf-16"), "UTF-16 with a BOM: not UTF-8 from the first byte",
            "no line of it parses",
        ),
        "binary.json": (image, "a PNG image given as the index", "no line of it parses"),
        "latin1.json": (
            b'[\n{"id": "caf\xe9"}\n]\n', "a JSON list with a Latin-1 byte", "not UTF-8 at line 2",
        ),
        "broken.json": (
            b'[\n{"id": "a"},\n{"id": "b",,}\n]\n', "a JSON list with a syntax error",
            "invalid JSON at line 3",
        ),
        "truncated.json": (sample.encode()[:-7], "a JSON list cut short", "invalid JSON"),
        "object.json": (
            json.dumps({"samples": [ok("a", "coco/ok-0.png")]}, indent=2).encode(),
            "one JSON object, not a list", "top-level JSON value is a dict",
        ),
        "deep.json": (b"[" * 100_000 + b"]" * 100_000, "a list nested 100000 deep",
                      "nested too deeply"),
        "bigint.json": (b'[{"id": ' + b"9" * 5000 + b"}]", "a 5000-digit number",
                        "digits"),
        "empty.json": (b"", "zero bytes", "the file is empty"),
        "blank.jsonl": (b"\n  \n\t\n", "only blank lines", "the file is empty"),
    }  # fmt: skip
    for name, (data, case, fragment) in files.items():
        (folder / name).write_bytes(data)
        m.bad_indexes[f"bad-index/{name}"] = fragment
        m.cases[f"bad-index/{name}"] = case
    m.bad_indexes["bad-index/missing.json"] = "file not found"
    m.cases["bad-index/missing.json"] = "no such file"
