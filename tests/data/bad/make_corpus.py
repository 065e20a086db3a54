"""Write the bad-input corpus: every way a LLaVA index, an image or a config can be wrong,
mixed with valid samples, plus a manifest of what must happen to each.

    python tests/data/bad/make_corpus.py --out DIR

Importable as `make_corpus(out_dir) -> Manifest`. The output is deterministic and built
from Pillow and bytes at run time (nothing binary is committed). Layout of DIR:

    images/                 the image root (valid and broken images, a FIFO, a symlink)
    outside/secret.png      a real image outside the root, which must never be read
    data.json, data.jsonl   the same records as a JSON list and as JSONL (plus bad lines)
    bad-index/*             index files that stop the command with one line
    augment.yaml, run.yaml  the good configs (`mia-dpo augment --config`, `mia-dpo run`)
    bad-config/*.yaml       configs that stop the command with one line naming the field
    manifest.json           expected outcome of every sample, index file and config

Run the commands with the corpus folder as the working directory: configs use
relative paths.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from PIL import Image

KEPT = "kept"
# Lowered limits in augment.yaml: big.jpg (1100x1000) is over max_image_pixels.
MAX_IMAGE_PIXELS = 1_000_000
MIN_SIDE = 8
PROMPT_CHARS = 1_000_000
GOOD_INPUT = "data.jsonl"  # what run.yaml augments


@dataclass(frozen=True)
class Case:
    """One record of an index. `id` is how outputs name it: the sample id, or `line-N`
    when the record has no usable id; `expect` is `kept` or the drop reason; `detail`
    a fragment of the recorded drop detail; `where` the place the drop is recorded
    (`augment`: the stage's shard-*.dropped.jsonl, `plan`: plan/problems.jsonl)."""

    id: str
    line: int
    case: str
    expect: str
    detail: str | None = None
    where: Literal["augment", "plan"] = "augment"


@dataclass
class Manifest:
    image_root: str = "images"
    good_config: str = "augment.yaml"
    run_config: str = "run.yaml"
    run_input: str = GOOD_INPUT
    indexes: dict[str, list[Case]] = field(default_factory=dict)
    bad_indexes: dict[str, str] = field(default_factory=dict)  # file -> error fragment
    bad_configs: dict[str, str] = field(default_factory=dict)  # file -> error fragment
    cases: dict[str, str] = field(default_factory=dict)  # file -> what is wrong with it

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        raw["indexes"] = {k: [Case(**c) for c in v] for k, v in raw["indexes"].items()}
        return cls(**raw)


# --- images -------------------------------------------------------------------------


def _png(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Declare another size in IHDR (CRC fixed); the pixel data stays as it was."""
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def _corrupt_idat(png: bytes) -> bytes:
    """Flip bytes inside the first IDAT chunk, leaving its CRC stale."""
    at = png.index(b"IDAT") + 4 + 8
    body = bytearray(png)
    for i in range(at, at + 16):
        body[i] ^= 0xFF
    return bytes(body)


def _write_images(root: Path, outside: Path) -> dict[str, str]:
    """Writes every image; returns {relative path: what it is} of the valid ones."""
    valid: dict[str, str] = {}

    def put(rel: str, data: bytes) -> str:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return rel

    colours = [(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 200, 20), (20, 190, 200),
               (170, 40, 170), (120, 120, 120), (240, 130, 20)]  # fmt: skip
    sizes = [(64, 48), (48, 64), (80, 80), (96, 60), (60, 96), (72, 54), (90, 90), (50, 70)]
    for i, (c, s) in enumerate(zip(colours, sizes, strict=True)):
        valid[put(f"coco/ok-{i}.png", _png(Image.new("RGB", s, c)))] = "RGB PNG"
    for i in range(3):
        jpeg = _encode(_noise((64 + 8 * i, 56), seed=i), "JPEG", quality=80)
        valid[put(f"coco/ok-{i}.jpg", jpeg)] = "RGB JPEG"
    misnamed = _encode(Image.new("RGB", (40, 40), (10, 90, 60)), "JPEG")
    valid[put("coco/misnamed.png", misnamed)] = "a JPEG named .png"

    modes = "coco/modes"
    cmyk = _encode(Image.new("CMYK", (64, 48), (0, 200, 100, 30)), "JPEG")
    valid[put(f"{modes}/cmyk.jpg", cmyk)] = "CMYK JPEG"
    valid[put(f"{modes}/gray16.png", _png(Image.new("I;16", (48, 64), 40000)))] = "16-bit PNG"
    tiff16 = _encode(Image.new("I;16B", (40, 40), 1234), "TIFF")
    valid[put(f"{modes}/gray16be.tif", tiff16)] = "16-bit big-endian TIFF"
    pal = Image.new("P", (56, 56), 1)
    pal.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    valid[put(f"{modes}/palette.png", _png(pal, transparency=0))] = "palette PNG, transparency"
    rgba = Image.new("RGBA", (64, 64), (200, 50, 120, 128))
    valid[put(f"{modes}/rgba.png", _png(rgba))] = "RGBA PNG, half transparent"
    valid[put(f"{modes}/la.png", _png(Image.new("LA", (40, 60), (90, 200))))] = "LA PNG"
    valid[put(f"{modes}/onebit.png", _png(Image.new("1", (33, 33), 1)))] = "1-bit PNG"
    frames = [Image.new("P", (40, 40), i) for i in (3, 7)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    valid[put(f"{modes}/anim.gif", gif.getvalue())] = "two-frame GIF"

    bad = "coco/bad"
    put(f"{bad}/empty.png", b"")
    noisy = _png(_noise((64, 64), seed=7))
    put(f"{bad}/trunc.png", noisy[: len(noisy) // 2])
    jpeg = _encode(_noise((96, 64), seed=8), "JPEG")
    put(f"{bad}/trunc.jpg", jpeg[:1500])
    put(f"{bad}/trunc-header.jpg", jpeg[:300])  # cut inside the tables, before any pixel
    cut_gif = _encode(_noise((64, 64), seed=9).convert("P"), "GIF")
    put(f"{bad}/trunc.gif", cut_gif[: len(cut_gif) // 2])
    webp = _encode(_noise((64, 64), seed=10), "WEBP")
    put(f"{bad}/trunc.webp", webp[: len(webp) // 2])
    put(f"{bad}/corrupt-idat.png", _corrupt_idat(noisy))
    put(f"{bad}/text.jpg", b"hello, I am not a picture\n")
    put(f"{bad}/ghost.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    put(f"{bad}/vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>')
    put(f"{bad}/header-only.png", _png(Image.new("RGB", (64, 64)))[:33])  # signature + IHDR
    tiny = _png(Image.new("RGB", (1, 1), (255, 0, 0)))
    put(f"{bad}/bomb.png", _patch_png_size(tiny, 100_000, 100_000))
    put(f"{bad}/bomb-under-pil.png", _patch_png_size(tiny, 4_000, 4_000))  # 16 MP
    put(f"{bad}/big.jpg", _encode(Image.new("RGB", (1100, 1000), (30, 30, 90)), "JPEG"))
    put(f"{bad}/one-pixel.png", tiny)
    put(f"{bad}/thin.png", _png(Image.new("RGB", (4, 200), (0, 0, 0))))
    (root / bad / "a-directory.png").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / bad / "fifo.png")
    (outside / "secret.png").write_bytes(_png(Image.new("RGB", (32, 32), (1, 2, 3))))
    (root / bad / "escape").symlink_to(os.path.relpath(outside, root / bad))
    put("solo/only.png", _png(Image.new("RGB", (32, 32), (5, 6, 7))))
    return valid


# --- records ------------------------------------------------------------------------


def _conv(*pairs: tuple[str, object]) -> list[dict[str, object]]:
    return [{"from": f, "value": v} for f, v in pairs]


def _ok(sid: object, image: object, question: str = "<image>\nWhat is shown?") -> dict:
    return {"id": sid, "image": image, "conversations": _conv(("human", question), ("gpt", "It."))}


_DROP = object()


def _with(sid: object, image: object = "coco/ok-0.png", **fields: object) -> dict:
    rec = _ok(sid, image)
    rec.update(fields)
    return {k: v for k, v in rec.items() if v is not _DROP}


def _records(valid: dict[str, str]) -> list[tuple[object, str, str, str | None]]:
    """(raw record, case, expected outcome, detail fragment), in index order. The label
    (id in outputs) is worked out later from the record and its line."""
    out: list[tuple[object, str, str, str | None]] = []

    def add(raw: object, case: str, expect: str = KEPT, detail: str | None = None) -> None:
        out.append((raw, case, expect, detail))

    # Valid samples, one per valid image, spread through the file.
    for i, (rel, what) in enumerate(sorted(valid.items())):
        add(_ok(f"ok-{i:02d}", rel), f"valid: {what}")
    add(_ok(42, "coco/ok-1.png"), "valid: integer id")
    add(
        {**_ok("ok-multi", "coco/ok-2.png"),
         "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "Blue."),
                                ("human", "Sure?"), ("gpt", "Yes."), ("human", "Unanswered?"))},
        "valid: several turns and a trailing unanswered question",
    )  # fmt: skip
    add(
        _ok("ok-unicode-✓", "coco/ok-3.png", "<image>\nQu'est-ce que c'est ? 日本語 😀"),
        "valid: non-ASCII id and text (emoji as a surrogate pair escape)",
    )
    add({**_ok("ok-source", "coco/ok-4.png"), "source": "coco"}, "valid: explicit source field")

    # The record itself.
    add(17, "record is a number", "not_an_object", "not an object")
    add("just text", "record is a string", "not_an_object", "not an object")
    add(None, "record is null", "not_an_object", "not an object")
    add([_ok("in-a-list", "coco/ok-0.png")], "record is a list", "not_an_object", "list")
    add(_with(_DROP), "no id", "missing_id", "'id'")
    add(_with(""), "empty id", "missing_id", "'id'")
    add(_with(1.5), "id is a float", "missing_id", "'id'")
    add(_with(True), "id is a boolean", "missing_id", "'id'")
    add(_with(["x"]), "id is a list", "missing_id", "'id'")
    add(_ok("dup", "coco/ok-5.png"), "valid: first use of an id")
    add(_ok("dup", "coco/ok-6.png"), "the same id again", "duplicate_id", "already used")

    # The image field.
    add(_with("no-image", _DROP), "no image field", "missing_image", "'image'")
    add(_with("empty-image", ""), "empty image field", "missing_image", "'image'")
    add(_with("int-image", 7), "image is a number", "bad_image_field", "'image'")
    add(_with("dict-image", {"path": "x.png"}), "image is an object", "bad_image_field", "'image'")
    add(
        _with("list-image", ["coco/ok-0.png", "coco/ok-1.png"]),
        "image is a list",
        "multi_image_source",
        "'image'",
    )

    # Conversations.
    add(_with("no-conv", conversations=_DROP), "no conversations", "missing_conversations",
        "'conversations'")  # fmt: skip
    add(_with("empty-conv", conversations=[]), "empty conversations", "bad_conversations",
        "'conversations'")  # fmt: skip
    add(_with("str-conv", conversations="<image> hi"), "conversations is a string",
        "bad_conversations", "'conversations'")  # fmt: skip
    add(_with("dict-conv", conversations={"from": "human", "value": "<image>"}),
        "conversations is an object", "bad_conversations", "'conversations'")  # fmt: skip
    add(_with("turn-not-object", conversations=["<image>\nQ?", "A."]), "a turn is a string",
        "bad_conversations", "conversations[0]")  # fmt: skip
    add(_with("value-int", conversations=_conv(("human", "<image>\nQ?"), ("gpt", 3))),
        "an answer is a number", "bad_conversations", "conversations[1].value")  # fmt: skip
    add(_with("user-assistant", conversations=_conv(("user", "<image>\nQ?"), ("assistant", "A"))),
        "user/assistant roles", "bad_conversations", "conversations[0].from")  # fmt: skip
    add(_with("question-only", conversations=_conv(("human", "<image>\nQ?"))),
        "a question with no answer", "bad_conversations", "no answered turn")  # fmt: skip
    add(_with("no-tag", conversations=_conv(("human", "What is it?"), ("gpt", "A."))),
        "no <image> tag", "no_image_tag", "conversations[0].value")  # fmt: skip
    add(_with("two-tags", conversations=_conv(("human", "<image><image>\nQ?"), ("gpt", "A."))),
        "two <image> tags", "too_many_image_tags", "2 <image> tags")  # fmt: skip
    nested: list = []
    for _ in range(500):
        nested = [nested]
    add(_with("deep-conv", conversations=nested), "conversations nested 500 levels deep",
        "bad_conversations", "conversations[0]")  # fmt: skip
    huge = "<image>\n" + "x" * PROMPT_CHARS
    add(_with("prompt-1mb", conversations=_conv(("human", huge), ("gpt", "A."))),
        "a 1 MB question", "prompt_too_long", "conversations[0].value")  # fmt: skip
    add(_with("lone-surrogate", conversations=_conv(("human", "<image>\nQ \ud800?"), ("gpt", "A"))),
        "text with an unpaired UTF-16 surrogate escape", "not_utf8", "surrogate")  # fmt: skip

    # Paths.
    add(_with("abs-etc", "/etc/passwd"), "absolute path", "unsafe_path", "absolute")
    add(_with("abs-root", "/srv/images/coco/ok-0.png"), "absolute path to a real-looking file",
        "unsafe_path", "absolute")  # fmt: skip
    add(_with("climb", "../outside/secret.png"), "climbs out with ..", "unsafe_path", "climbs out")
    add(_with("climb-deep", "coco/../../outside/secret.png"), "climbs out from a folder",
        "unsafe_path", "climbs out")  # fmt: skip
    add(_with("drive", "C:\\images\\x.png"), "Windows drive path", "unsafe_path", "backslash")
    add(_with("nul", "coco/ok-0.png\u0000.txt"), "NUL byte in path", "unsafe_path", "NUL")
    add(_with("symlink-out", "coco/bad/escape/secret.png"), "symlink leaving the root",
        "unsafe_path", "outside the image root")  # fmt: skip

    # Image files.
    bad = "coco/bad"
    for sid, rel, case, reason in [
        ("img-missing", f"{bad}/nope.png", "missing file", "image_missing"),
        ("img-dir", f"{bad}/a-directory.png", "path is a directory", "image_missing"),
        ("img-empty", f"{bad}/empty.png", "zero-byte file", "image_empty"),
        ("img-trunc-png", f"{bad}/trunc.png", "truncated PNG", "image_truncated"),
        ("img-trunc-jpg", f"{bad}/trunc.jpg", "truncated JPEG", "image_truncated"),
        ("img-trunc-jpg-header", f"{bad}/trunc-header.jpg", "JPEG cut inside its header",
         "image_truncated"),
        ("img-trunc-gif", f"{bad}/trunc.gif", "truncated GIF", "image_truncated"),
        ("img-trunc-webp", f"{bad}/trunc.webp", "truncated WebP", "image_truncated"),
        ("img-header-only", f"{bad}/header-only.png", "PNG with no pixel data", "image_truncated"),
        ("img-corrupt", f"{bad}/corrupt-idat.png", "PNG with corrupt pixel data",
         "image_unreadable"),
        ("img-text", f"{bad}/text.jpg", "text file named .jpg", "image_unreadable"),
        ("img-eps", f"{bad}/ghost.eps", "EPS (never handed to Ghostscript)", "image_unreadable"),
        ("img-svg", f"{bad}/vector.svg", "SVG", "image_unreadable"),
        ("img-bomb", f"{bad}/bomb.png", "PNG header declaring 100000x100000",
         "image_too_large"),
        ("img-bomb-small", f"{bad}/bomb-under-pil.png", "PNG header declaring 4000x4000",
         "image_too_large"),
        ("img-big", f"{bad}/big.jpg", "real 1100x1000 JPEG over max_image_pixels",
         "image_too_large"),
        ("img-1x1", f"{bad}/one-pixel.png", "1x1 image", "image_too_small"),
        ("img-thin", f"{bad}/thin.png", "4x200 image", "image_too_small"),
        ("img-fifo", f"{bad}/fifo.png", "a named pipe (FIFO)", "image_unreadable"),
        ("solo", "solo/only.png", "the only image of its source subset", "too_few_distractors"),
    ]:  # fmt: skip
        add(_ok(sid, rel), case, reason, rel if reason.startswith("image_") else None)
    if not hasattr(os, "mkfifo"):
        out[:] = [r for r in out if not (isinstance(r[0], dict) and r[0].get("id") == "img-fifo")]
    # Valid samples after all the bad ones still come through.
    add(_ok("ok-last", "coco/ok-7.png"), "valid: last record")
    return out


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


def _write_indexes(out: Path, records: list[tuple[object, str, str, str | None]], m: Manifest):
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


def _write_bad_indexes(out: Path, m: Manifest) -> None:
    folder = out / "bad-index"
    folder.mkdir()
    sample = json.dumps([_ok("a", "coco/ok-0.png")])
    png = _png(Image.new("RGB", (8, 8), (1, 1, 1)))
    files: dict[str, tuple[bytes, str, str]] = {
        "utf16.json": (
            sample.encode("utf-16"), "UTF-16 with a BOM: not UTF-8 from the first byte",
            "no line of it parses",
        ),
        "binary.json": (png, "a PNG image given as the index", "no line of it parses"),
        "latin1.json": (
            b'[\n{"id": "caf\xe9"}\n]\n', "a JSON list with a Latin-1 byte", "not UTF-8 at line 2",
        ),
        "broken.json": (
            b'[\n{"id": "a"},\n{"id": "b",,}\n]\n', "a JSON list with a syntax error",
            "invalid JSON at line 3",
        ),
        "truncated.json": (sample.encode()[:-7], "a JSON list cut short", "invalid JSON"),
        "object.json": (
            json.dumps({"samples": [_ok("a", "coco/ok-0.png")]}, indent=2).encode(),
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


def _good_config(store: str, index: str = GOOD_INPUT) -> dict[str, Any]:
    return {
        "seed": 3,
        "stages": ["augment"],
        "input": {
            "path": index,
            "image_root": "images",
            "shard_size": 8,
            "max_image_pixels": MAX_IMAGE_PIXELS,
            "min_image_side_px": MIN_SIDE,
        },
        "store": {"backend": "local", "root": store},
        "queue": {"backend": "memory"},
        "launcher": {"kind": "inline", "default_workers": 2},
        "augment": {
            "sequence_counts": {2: 0.6, 3: 0.4},
            "grid_counts": {2: 0.6, 3: 0.4},
            "grid_tile_px": 64,
            "grid_margin_px": 16,
            "grid_label_font_px": 12,
        },
    }


def _write_configs(out: Path, m: Manifest) -> None:
    def dump(path: Path, data: object) -> None:
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    dump(out / "augment.yaml", {k: v for k, v in _good_config("unused").items()
                                if k in ("input", "augment")})  # fmt: skip
    dump(out / "run.yaml", _good_config("store"))
    folder = out / "bad-config"
    folder.mkdir()

    def bad(name: str, case: str, fragment: str, edit: Any) -> None:
        data = _good_config(f"store-{name}")
        edit(data)
        dump(folder / f"{name}.yaml", data)
        m.bad_configs[f"bad-config/{name}.yaml"] = fragment
        m.cases[f"bad-config/{name}.yaml"] = case

    def setter(dotted: str, value: object) -> Any:
        def edit(data: dict[str, Any]) -> None:
            *parents, leaf = dotted.split(".")
            for key in parents:
                data = data.setdefault(key, {})
            data[leaf] = value

        return edit

    bad("unknown-top", "unknown top-level key", "stagez: unknown key", setter("stagez", ["x"]))
    bad("unknown-nested", "unknown key in a section", "input.max_pixels: unknown key",
        setter("input.max_pixels", 5))  # fmt: skip
    bad("unknown-section", "unknown section", "augmentation: unknown key",
        setter("augmentation", {"formats": {"grid": 1}}))  # fmt: skip
    bad("shard-size-zero", "input.shard_size 0", "input.shard_size",
        setter("input.shard_size", 0))  # fmt: skip
    bad("max-pixels-negative", "input.max_image_pixels -1", "input.max_image_pixels",
        setter("input.max_image_pixels", -1))  # fmt: skip
    bad("min-side-text", "input.min_image_side_px is text", "input.min_image_side_px",
        setter("input.min_image_side_px", "big"))  # fmt: skip
    bad("seed-negative", "seed -3", "seed", setter("seed", -3))
    bad("pip-scale", "augment.pip_scale 1.5", "augment.pip_scale",
        setter("augment.pip_scale", 1.5))  # fmt: skip
    bad("formats-zero", "every format weight 0", "augment.formats",
        setter("augment.formats", {"sequence": 0, "grid": 0, "pic_in_pic": 0}))  # fmt: skip
    bad("format-unknown", "unknown format name", "augment.formats",
        setter("augment.formats", {"mosaic": 1.0}))  # fmt: skip
    bad("grid-count", "grid of 5 images", "augment.grid_counts",
        setter("augment.grid_counts", {5: 1.0}))  # fmt: skip
    bad("workers-zero", "launcher.default_workers 0", "launcher.default_workers",
        setter("launcher.default_workers", 0))  # fmt: skip
    bad("stage-unknown", "unknown stage", "stages", setter("stages", ["augment", "frobnicate"]))
    bad("holdout-one", "input.holdout_fraction 1.0", "input.holdout_fraction",
        setter("input.holdout_fraction", 1.0))  # fmt: skip

    def raw(name: str, case: str, fragment: str, data: bytes) -> None:
        (folder / f"{name}.yaml").write_bytes(data)
        m.bad_configs[f"bad-config/{name}.yaml"] = fragment
        m.cases[f"bad-config/{name}.yaml"] = case

    raw("not-yaml", "not YAML", "not valid YAML", b"seed: [1, 2\ninput: {\n")
    raw("not-utf8", "Latin-1 bytes", "not valid YAML", b"input:\n  path: donn\xe9es.json\n")
    raw("list", "a YAML list", "top level must be a mapping", b"- seed: 1\n")
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        laughs += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    raw("alias-bomb", "YAML aliases expanding to 10^10 items", "a0: unknown key",
        laughs.encode())  # fmt: skip
    raw("secret", "a credential in the file", "MIA_DPO_S3_SECRET_KEY",
        b"store:\n  secret_key: hunter2\n")  # fmt: skip
    m.cases["augment.yaml"] = "good: lowered image limits, small grid tiles (augment --config)"
    m.cases["run.yaml"] = f"good: stages [augment] on {GOOD_INPUT}, local store, memory queue"


def make_corpus(out_dir: str | Path) -> Manifest:
    """Write the corpus into `out_dir` and return its manifest. An earlier corpus there
    is replaced; any other non-empty folder is refused, never emptied."""
    out = Path(out_dir)
    if out.exists():
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise FileExistsError(f"{out}: not empty and not a corpus; choose another --out")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "outside").mkdir()
    m = Manifest()
    valid = _write_images(out / "images", out / "outside")
    _write_indexes(out, _records(valid), m)
    _write_bad_indexes(out, m)
    _write_configs(out, m)
    (out / "manifest.json").write_text(m.to_json(), encoding="utf-8")
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("corpus")), help="folder")
    args = p.parse_args(argv)
    try:
        m = make_corpus(args.out)
    except FileExistsError as e:
        print(f"make_corpus: error: {e}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in m.indexes.values())
    print(f"{n} index records, {len(m.bad_indexes)} bad index files, "
          f"{len(m.bad_configs)} bad configs -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
