"""Reading LLaVA-format input: index files, sample validation, path safety, image decoding.

Every bad input is built here from PIL and bytes; there are no binary fixtures.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from pydantic import ValidationError

from mia_dpo.data.images import decode_image
from mia_dpo.data.source import (
    SourceSample,
    parse_sample,
    read_index,
    resolve_image,
    safe_relative_path,
)
from mia_dpo.errors import SampleError, UserError

_DROP = object()  # marks a key to leave out of the sample


def _sample(**overrides: object) -> dict:
    raw: dict = {
        "id": "s1",
        "image": "coco/train2017/x.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "A cat."},
        ],
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not _DROP}


# --- read_index ---------------------------------------------------------------------


def test_json_list_detected_after_bom_and_whitespace() -> None:
    data = b"\xef\xbb\xbf \n  " + json.dumps([_sample(id="a"), _sample(id="b")]).encode()
    records, problems = read_index(data, "data.json")
    assert problems == []
    assert [(n, r["id"]) for n, r in records] == [(1, "a"), (2, "b")]


def test_jsonl_mixed_good_and_bad_lines_keep_line_numbers() -> None:
    lines = [
        json.dumps(_sample(id="a")).encode(),
        b"",
        b'{"id": "broken", ',
        json.dumps(_sample(id="c")).encode() + b"\r",
        b'{"id": "caf\xe9"}',
        b"   ",
        json.dumps(_sample(id="g")).encode(),
    ]
    records, problems = read_index(b"\n".join(lines), "train.jsonl")
    assert [(n, r["id"]) for n, r in records] == [(1, "a"), (4, "c"), (7, "g")]
    assert [(n, reason) for n, reason, _ in problems] == [(3, "invalid_json"), (5, "not_utf8")]
    for n, _, detail in problems:
        assert detail.startswith(f"train.jsonl: line {n}:")
        assert "\n" not in detail


def test_jsonl_bom_on_first_line_is_ignored() -> None:
    records, problems = read_index(b"\xef\xbb\xbf" + json.dumps(_sample()).encode(), "x.jsonl")
    assert problems == [] and records[0][0] == 1


@pytest.mark.parametrize("data", [b"", b"  \n\t\n", b"\xef\xbb\xbf"])
def test_empty_file_is_a_user_error(data: bytes) -> None:
    with pytest.raises(UserError, match=r"^data\.json: .*empty"):
        read_index(data, "data.json")


def test_broken_json_list_names_line_and_column() -> None:
    data = b'[\n  {"id": 1},\n  {"id": 2,,}\n]'
    with pytest.raises(UserError) as err:
        read_index(data, "data.json")
    msg = str(err.value)
    assert msg.startswith("data.json: ") and "line 3, column 12" in msg and "\n" not in msg


def test_json_list_not_utf8_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"data\.json: not UTF-8 at line 2"):
        read_index(b'[\n"\xff"]', "data.json")


def test_pretty_printed_object_is_a_user_error() -> None:
    data = json.dumps({"samples": [_sample()]}, indent=2).encode()
    with pytest.raises(UserError, match=r"^meta\.json: top-level JSON value is a dict"):
        read_index(data, "meta.json")


# --- parse_sample -------------------------------------------------------------------


def test_good_sample_keeps_raw_text_and_drops_trailing_question() -> None:
    conv = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "And its colour?"},
        {"from": "gpt", "value": "Black."},
        {"from": "human", "value": "Unanswered?"},
    ]
    s = parse_sample(_sample(id=42, conversations=conv), 9)
    assert s.id == "42" and s.line == 9 and s.source == "coco"
    assert [(t.question, t.answer) for t in s.turns] == [
        ("<image>\nWhat is it?", "A cat."),
        ("And its colour?", "Black."),
    ]
    with pytest.raises(ValidationError):
        s.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        SourceSample(**s.model_dump(), extra="no")


@pytest.mark.parametrize(
    ("source", "image", "expected"),
    [
        ("gqa", "coco/x.jpg", "gqa"),
        ("", "coco/train2017/x.jpg", "coco"),
        (None, "./vg/VG_100K/1.jpg", "vg"),
        (None, "x.jpg", "default"),
    ],
)
def test_source_from_field_or_folder(source: str | None, image: str, expected: str) -> None:
    raw = _sample(image=image, source=source if source is not None else _DROP)
    assert parse_sample(raw, 1).source == expected


def _conv(*pairs: tuple[object, object]) -> list[dict]:
    return [{"from": f, "value": v} for f, v in pairs]


_IMG_Q = ("human", "<image>\nQ?")
_ANS = ("gpt", "A.")


@pytest.mark.parametrize(
    ("raw", "reason", "named"),
    [
        (["not", "a", "dict"], "not_an_object", "object"),
        ("text", "not_an_object", "object"),
        (_sample(id=_DROP), "missing_id", "'id'"),
        (_sample(id=""), "missing_id", "'id'"),
        (_sample(id=None), "missing_id", "'id'"),
        (_sample(id=1.5), "missing_id", "'id'"),
        (_sample(image=_DROP), "missing_image", "'image'"),
        (_sample(image=""), "missing_image", "'image'"),
        (_sample(image=7), "bad_image_field", "'image'"),
        (_sample(image=["a.jpg", "b.jpg"]), "multi_image_source", "'image'"),
        (_sample(conversations=_DROP), "missing_conversations", "'conversations'"),
        (_sample(conversations="hi"), "bad_conversations", "'conversations'"),
        (_sample(conversations=[]), "bad_conversations", "'conversations'"),
        (_sample(conversations=[_IMG_Q]), "bad_conversations", "conversations[0]"),
        (_sample(conversations=_conv(_IMG_Q)), "bad_conversations", "answered"),
        (_sample(conversations=_conv(("gpt", "<image>"), _ANS)), "bad_conversations", "[0].from"),
        (
            _sample(conversations=_conv(("user", "<image>"), ("assistant", "A"))),
            "bad_conversations",
            "'user'/'assistant' are not accepted",
        ),
        (_sample(conversations=_conv(_IMG_Q, ("gpt", 3))), "bad_conversations", "[1].value"),
        (_sample(conversations=_conv(_IMG_Q, _IMG_Q)), "bad_conversations", "[1].from"),
        (_sample(conversations=_conv(("human", "Q?"), _ANS)), "no_image_tag", "[0].value"),
        (
            _sample(conversations=_conv(("human", "<image><image>Q"), _ANS)),
            "too_many_image_tags",
            "conversations",
        ),
        (
            _sample(conversations=_conv(_IMG_Q, _ANS, ("human", "<image> again?"), _ANS)),
            "too_many_image_tags",
            "conversations",
        ),
        (
            _sample(conversations=_conv(_IMG_Q, ("gpt", "x" * 11))),
            "prompt_too_long",
            "conversations[1].value",
        ),
        (
            _sample(conversations=_conv(_IMG_Q, _ANS, ("human", "q" * 11), _ANS)),
            "prompt_too_long",
            "conversations[2].value",
        ),
    ],
)
def test_bad_samples_say_why(raw: object, reason: str, named: str) -> None:
    with pytest.raises(SampleError) as err:
        parse_sample(raw, 3, max_text_chars=10)
    assert err.value.reason == reason
    assert named in err.value.detail
    assert "\n" not in err.value.detail


def test_text_limit_is_inclusive() -> None:
    raw = _sample(conversations=_conv(("human", "<image>" + "q" * 3), ("gpt", "a" * 10)))
    assert parse_sample(raw, 1, max_text_chars=10).turns[0].answer == "a" * 10


# --- paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "expected"),
    [("a/b.jpg", "a/b.jpg"), ("./a//b/../c.jpg", "a/c.jpg"), ("a/..b.jpg", "a/..b.jpg")],
)
def test_safe_relative_path_normalises(rel: str, expected: str) -> None:
    assert safe_relative_path(rel) == expected


@pytest.mark.parametrize(
    "rel",
    ["", "/etc/passwd", "//server/x", "C:\\x.jpg", "C:/x.jpg", "\\\\server\\share\\x",
     "a\\b.jpg", "a\0.jpg", "..", "../x.jpg", "a/../../x.jpg", "a/.."],
)  # fmt: skip
def test_unsafe_paths_are_refused(rel: str) -> None:
    with pytest.raises(SampleError) as err:
        safe_relative_path(rel)
    assert err.value.reason == "unsafe_path" and "'image'" in err.value.detail


def test_resolve_local_and_s3(tmp_path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    assert resolve_image(str(root), "./coco/x.jpg") == os.path.join(
        os.path.realpath(root), "coco/x.jpg"
    )
    assert resolve_image("s3://bucket/pre/", "coco/x.jpg") == "s3://bucket/pre/coco/x.jpg"
    assert resolve_image("s3://bucket", "x.jpg") == "s3://bucket/x.jpg"
    with pytest.raises(SampleError, match="absolute"):
        resolve_image("s3://bucket", "/x.jpg")
    with pytest.raises(UserError):
        resolve_image("s3://", "x.jpg")


def test_symlink_escaping_the_root_is_refused(tmp_path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "inside.jpg").write_bytes(b"x")
    (root / "escape").symlink_to(outside)
    (root / "alias.jpg").symlink_to(root / "inside.jpg")
    with pytest.raises(SampleError) as err:
        resolve_image(str(root), "escape/secret.jpg")
    assert err.value.reason == "unsafe_path" and "escape/secret.jpg" in err.value.detail
    assert resolve_image(str(root), "alias.jpg").endswith("alias.jpg")


# --- decode_image -------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _decode(data: bytes, max_pixels: int = 10_000_000, min_side: int = 1) -> Image.Image:
    return decode_image(data, "img/x.png", max_pixels=max_pixels, min_side=min_side)


def _reason(data: bytes, **kw: int) -> str:
    with pytest.raises(SampleError) as err:
        _decode(data, **kw)
    assert "img/x.png" in err.value.detail and "\n" not in err.value.detail
    return err.value.reason


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height and its CRC; the pixel data stays 1x1."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def test_decompression_bomb_refused_from_the_header() -> None:
    png = _encode(Image.new("RGB", (1, 1), "red"))
    start = time.perf_counter()
    assert _reason(_patch_png_size(png, 100_000, 100_000)) == "image_too_large"
    # Under PIL's own guard, our max_pixels still decides before any decoding.
    assert _reason(_patch_png_size(png, 3000, 3000), max_pixels=1_000_000) == "image_too_large"
    assert time.perf_counter() - start < 1.0


def test_empty_unreadable_small() -> None:
    assert _reason(b"") == "image_empty"
    assert _reason(b"this is not an image at all") == "image_unreadable"
    assert _reason(b"%!PS-Adobe-3.0 EPSF-3.0\n") == "image_unreadable"  # EPS is not allowed
    assert _reason(_encode(Image.new("RGB", (40, 8))), min_side=10) == "image_too_small"
    assert _decode(_encode(Image.new("RGB", (40, 10))), min_side=10).size == (40, 10)


def test_truncated_jpeg_even_if_pil_is_told_to_tolerate_it(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg = _encode(noisy, "JPEG")
    assert _reason(jpeg[: len(jpeg) // 2]) == "image_truncated"
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert _reason(jpeg[: len(jpeg) // 2]) == "image_truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


def _pixels(im: Image.Image) -> list[tuple[int, int, int]]:
    assert im.mode == "RGB"
    return [tuple(p) for p in np.asarray(im).reshape(-1, 3).tolist()]


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    im = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert im.mode == "I;16"
    assert _pixels(_decode(_encode(im))) == [(0, 0, 0), (1, 1, 1), (128,) * 3, (255,) * 3]


def test_big_endian_sixteen_bit_tiff() -> None:
    im = Image.fromarray(np.array([[0, 32768, 65535]], dtype=">u2"))
    assert Image.open(io.BytesIO(_encode(im, "TIFF"))).mode == "I;16B"
    assert _pixels(_decode(_encode(im, "TIFF"))) == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_thirty_two_bit_and_float_tiff() -> None:
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert _pixels(_decode(_encode(wide, "TIFF"))) == [(0, 0, 0), (255, 255, 255)]
    flt = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert flt.mode == "F"
    assert _pixels(_decode(_encode(flt, "TIFF"))) == [(0, 0, 0), (128,) * 3, (255,) * 3]


def test_cmyk_becomes_rgb() -> None:
    im = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta and yellow
    assert set(_pixels(_decode(_encode(im, "TIFF")))) == {(255, 0, 0)}


def test_palette_with_transparency_lands_on_white() -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((1, 0), 1)
    assert _pixels(_decode(_encode(im, transparency=0))) == [(255, 255, 255), (0, 0, 255)]
    assert _pixels(_decode(_encode(im))) == [(255, 0, 0), (0, 0, 255)]


def test_rgba_and_la_composite_over_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    for x, px in enumerate([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)]):
        rgba.putpixel((x, 0), px)
    out = _pixels(_decode(_encode(rgba)))
    assert out[:2] == [(255, 255, 255), (0, 0, 255)]
    assert all(126 <= c <= 128 for c in out[2])
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert _pixels(_decode(_encode(la))) == [(255, 255, 255), (0, 0, 0)]


def test_one_bit_and_gray() -> None:
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    assert _pixels(_decode(_encode(bw))) == [(0, 0, 0), (255, 255, 255)]
    assert _pixels(_decode(_encode(Image.new("L", (1, 1), 77)))) == [(77, 77, 77)]


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert set(_pixels(_decode(data))) == {(255, 0, 0)}


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (40, 20), "white")
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90° clockwise turn
    out = _decode(_encode(im, "PNG", exif=exif.tobytes()))
    assert out.size == (20, 40)
    assert _pixels(out.crop((0, 0, 20, 1)))[0] == (255, 0, 0)  # red now on top
    assert _pixels(out.crop((0, 39, 20, 40)))[0] == (255, 255, 255)
