"""Image composition for the grid-collage and pic-in-pic formats (docs/method.md §1b, §1c).

Pure PIL: images in, images (and deterministic encoded bytes) out. Callers convert
their inputs to RGB first; every function here refuses other modes so a stray
palette or alpha image cannot silently change the colours a test or model sees.

The defaults below (448 px tiles, 40 px margins, 36 px labels, 70 % inset) are the
reference implementation's constants; the augment config passes its own values.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Literal

from PIL import Image, ImageDraw, ImageFont, features

from mia_dpo.errors import UserError

# (rows, cols) per image count; 2 and 3 images sit in one row, as in the reference.
GRID_LAYOUTS: dict[int, tuple[int, int]] = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive

# Fixed encoder settings: the same image must always give the same bytes, so that
# reruns overwrite identical objects and content hashes stay stable.
_PNG_COMPRESS_LEVEL = 6
_JPEG_SUBSAMPLING = 0  # 4:4:4: keeps the thin black label strokes sharp


def grid_layout(n: int) -> tuple[int, int]:
    """(rows, cols) of the collage for `n` images."""
    try:
        return GRID_LAYOUTS[n]
    except KeyError:
        raise ValueError(
            f"grid image count must be one of {sorted(GRID_LAYOUTS)}, got {n}"
        ) from None


def grid_canvas_size(n: int, tile_px: int = 448, margin_px: int = 40) -> tuple[int, int]:
    """(width, height) of the collage canvas for `n` images.

    Columns are separated by one margin; every row gets a margin-high label band
    above it, hence `rows * margin` (not `rows - 1`) in the height.
    """
    rows, cols = grid_layout(n)
    width = cols * tile_px + (cols - 1) * margin_px
    height = rows * tile_px + rows * margin_px
    return width, height


def grid_tile_origin(index0: int, cols: int, tile_px: int, margin_px: int) -> tuple[int, int]:
    """Top-left pixel of tile `index0` (0-based, row-major), just below its label band."""
    row, col = divmod(index0, cols)
    return col * (tile_px + margin_px), row * (tile_px + margin_px) + margin_px


def fit_size(w: int, h: int, max_w: int, max_h: int) -> tuple[int, int]:
    """Largest (w2, h2) with the aspect ratio of (w, h) inside (max_w, max_h).

    Scales up as well as down, so tiny images fill their tile like large ones do.
    """
    if min(w, h, max_w, max_h) < 1:
        raise ValueError(f"sizes must be >= 1, got image {w}x{h} and box {max_w}x{max_h}")
    scale = min(max_w / w, max_h / h)
    # round() keeps the aspect error under one pixel; the clamp absorbs the case where
    # rounding (or float error on the limiting side) lands one pixel outside the box.
    w2 = max(1, min(max_w, round(w * scale)))
    h2 = max(1, min(max_h, round(h * scale)))
    return w2, h2


@lru_cache(maxsize=8)
def _label_font(font_px: int) -> ImageFont.FreeTypeFont:
    # Pillow only ships its default TrueType font through FreeType; without it,
    # load_default() would fall back to a fixed 11 px bitmap font and the labels
    # would silently differ from what the method specifies.
    if not features.check("freetype2"):
        raise UserError(
            "Pillow was built without FreeType, needed to draw the Image{k} labels: "
            "pip install --force-reinstall pillow (the wheels include FreeType)"
        )
    font = ImageFont.load_default(size=font_px)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise UserError("Pillow returned a bitmap default font; install Pillow >= 10.1")
    return font


def _require_rgb(img: Image.Image, what: str) -> None:
    if img.mode != "RGB":
        raise ValueError(f"{what} must be an RGB image, got mode {img.mode!r}")


def _draw_label(
    canvas: Image.Image, text: str, x: int, y: int, width: int, height: int, font_px: int
) -> None:
    """Draw `text` in the band (x, y, width, height), clipped to that band.

    The label is drawn on a band-sized image and pasted, so a large font or a small
    margin can never spill black strokes onto a neighbouring tile's content.
    """
    if width < 1 or height < 1:
        return
    font = _label_font(font_px)
    band = Image.new("RGB", (width, height), "white")
    # Centre the ink (not the font's ascent/descent box) vertically: with 36 px text in
    # a 40 px band the metric box would push the "g" descender out of the band.
    _, top, _, bottom = font.getbbox(text)
    offset_y = (height - (bottom - top)) // 2 - top
    ImageDraw.Draw(band).text((0, offset_y), text, fill="black", font=font)
    canvas.paste(band, (x, y))


def compose_grid(
    images: list[Image.Image], tile_px: int = 448, margin_px: int = 40, font_px: int = 36
) -> tuple[Image.Image, list[Box]]:
    """Paste `images` row-major into one labelled collage.

    Returns the canvas and, per input image, the box of its pasted pixels, which the
    selection stage maps onto the vision encoder's patch grid.
    """
    _rows, cols = grid_layout(len(images))
    if tile_px < 1 or margin_px < 0 or font_px < 1:
        raise ValueError(
            f"need tile_px >= 1, margin_px >= 0, font_px >= 1; "
            f"got {tile_px}, {margin_px}, {font_px}"
        )
    for i, img in enumerate(images):
        _require_rgb(img, f"grid image {i + 1}")

    canvas = Image.new("RGB", grid_canvas_size(len(images), tile_px, margin_px), "white")
    boxes: list[Box] = []
    for i, img in enumerate(images):
        x, y = grid_tile_origin(i, cols, tile_px, margin_px)
        w, h = fit_size(img.width, img.height, tile_px, tile_px)
        canvas.paste(img.resize((w, h), Image.Resampling.LANCZOS), (x, y))
        boxes.append((x, y, x + w, y + h))
        _draw_label(canvas, f"Image{i + 1}", x, y - margin_px, tile_px, margin_px, font_px)
    return canvas, boxes


def compose_pic_in_pic(
    background: Image.Image, target: Image.Image, scale: float = 0.7
) -> tuple[Image.Image, Box]:
    """Paste `target` at the exact centre of a copy of `background`.

    The target is fitted within `scale` of the background's width and height.
    Returns the composite and the target's box.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"pic-in-pic scale must be in (0, 1], got {scale}")
    _require_rgb(background, "pic-in-pic background")
    _require_rgb(target, "pic-in-pic target")

    bw, bh = background.size
    # The epsilon stops float error (0.7 * 90 = 62.99999999999999) from costing a
    # pixel of the allowed area.
    max_w = max(1, math.floor(bw * scale + 1e-9))
    max_h = max(1, math.floor(bh * scale + 1e-9))
    w, h = fit_size(target.width, target.height, max_w, max_h)
    x, y = (bw - w) // 2, (bh - h) // 2

    composite = background.copy()
    composite.paste(target.resize((w, h), Image.Resampling.LANCZOS), (x, y))
    return composite, (x, y, x + w, y + h)


def encode_image(img: Image.Image, fmt: Literal["jpeg", "png"], quality: int = 95) -> bytes:
    """Encode `img` to bytes that depend only on its pixels, mode and the arguments.

    Metadata (EXIF, ICC profile, text chunks) is dropped: a copy with an empty `info`
    is saved, because PNG's encoder otherwise re-emits an inherited ICC profile.
    """
    clean = img.copy()
    clean.info = {}
    buf = io.BytesIO()
    if fmt == "jpeg":
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        clean.save(
            buf,
            format="JPEG",
            quality=quality,
            subsampling=_JPEG_SUBSAMPLING,
            optimize=False,
            progressive=False,
        )
    elif fmt == "png":
        clean.save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    else:
        raise ValueError(f"image format must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()
