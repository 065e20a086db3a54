"""Pixel-level checks of the grid collage and pic-in-pic composition."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from mia_dpo.augmentation.compose import (
    GRID_LAYOUTS,
    compose_grid,
    compose_pic_in_pic,
    encode_image,
    fit_size,
    grid_canvas_size,
    grid_layout,
    grid_tile_origin,
)

COLOURS = [
    (220, 20, 60),
    (30, 144, 255),
    (50, 205, 50),
    (255, 215, 0),
    (148, 0, 211),
    (255, 140, 0),
    (0, 206, 209),
    (139, 69, 19),
    (255, 105, 180),
]
# wide, tall, square, tiny (upscaled), large (downscaled), odd ratios
SIZES = [(300, 100), (60, 240), (128, 128), (3, 5), (1200, 900), (7, 2), (500, 333), (41, 97)]


def solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def grid_inputs(n: int) -> list[Image.Image]:
    return [solid(SIZES[(i + n) % len(SIZES)], COLOURS[i]) for i in range(n)]


def assert_colour(pixel: tuple[int, ...], colour: tuple[int, int, int], tol: int = 2) -> None:
    assert all(abs(a - b) <= tol for a, b in zip(pixel, colour, strict=True)), (pixel, colour)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, (936, 488)), (3, (1424, 488)), (4, (936, 976)), (6, (1424, 976)), (9, (1424, 1464))],
)
def test_canvas_size_defaults(n: int, expected: tuple[int, int]) -> None:
    assert grid_canvas_size(n) == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(2, (136, 72)), (3, (208, 72)), (4, (136, 144)), (6, (208, 144)), (9, (208, 216))],
)
def test_canvas_size_small_tile(n: int, expected: tuple[int, int]) -> None:
    assert grid_canvas_size(n, tile_px=64, margin_px=8) == expected


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 10])
def test_unsupported_grid_counts(n: int) -> None:
    with pytest.raises(ValueError, match="grid image count"):
        grid_layout(n)
    with pytest.raises(ValueError, match="grid image count"):
        compose_grid([solid((4, 4), (0, 0, 0))] * n)


def test_tile_origin_row_major() -> None:
    assert grid_tile_origin(0, 3, 448, 40) == (0, 40)
    assert grid_tile_origin(2, 3, 448, 40) == (976, 40)
    assert grid_tile_origin(4, 3, 448, 40) == (488, 528)
    assert grid_tile_origin(8, 3, 448, 40) == (976, 1016)
    assert grid_tile_origin(3, 2, 64, 8) == (72, 80)


@pytest.mark.parametrize(
    ("size", "box", "expected"),
    [
        ((300, 100), (448, 448), (448, 149)),
        ((60, 240), (448, 448), (112, 448)),
        ((3, 5), (448, 448), (269, 448)),
        ((1200, 900), (448, 448), (448, 336)),
        ((1000, 1), (448, 448), (448, 1)),  # never collapses to 0 px
        ((100, 100), (63, 70), (63, 63)),
    ],
)
def test_fit_size(size: tuple[int, int], box: tuple[int, int], expected: tuple[int, int]) -> None:
    assert fit_size(*size, *box) == expected


def test_fit_size_never_exceeds_box() -> None:
    for w in range(1, 60, 7):
        for h in range(1, 60, 5):
            for bw, bh in [(13, 29), (31, 7), (448, 448), (90, 63)]:
                w2, h2 = fit_size(w, h, bw, bh)
                assert 1 <= w2 <= bw and 1 <= h2 <= bh
                assert w2 == bw or h2 == bh  # fills the box on the limiting side


def test_non_rgb_rejected() -> None:
    with pytest.raises(ValueError, match="RGB"):
        compose_grid([solid((4, 4), (0, 0, 0)), Image.new("L", (4, 4))])
    with pytest.raises(ValueError, match="RGB"):
        compose_pic_in_pic(Image.new("RGBA", (40, 40)), solid((4, 4), (0, 0, 0)))


def check_grid(n: int, tile: int, margin: int, font_px: int) -> np.ndarray:
    images = grid_inputs(n)
    canvas, boxes = compose_grid(images, tile_px=tile, margin_px=margin, font_px=font_px)
    assert canvas.mode == "RGB"
    assert canvas.size == grid_canvas_size(n, tile, margin)
    assert len(boxes) == n
    _, cols = GRID_LAYOUTS[n]
    pixels = np.asarray(canvas)
    outside = np.ones(pixels.shape[:2], dtype=bool)  # neither content nor label band

    for i, (img, (x0, y0, x1, y1)) in enumerate(zip(images, boxes, strict=True)):
        row, col = divmod(i, cols)
        tx, ty = col * (tile + margin), row * (tile + margin) + margin
        # Content starts at the tile's top-left corner and stays inside the tile.
        assert (x0, y0) == (tx, ty)
        assert tx < x1 <= tx + tile and ty < y1 <= ty + tile
        w, h = x1 - x0, y1 - y0
        assert w == tile or h == tile
        assert abs(w - h * img.width / img.height) <= 1 or abs(h - w * img.height / img.width) <= 1
        assert_colour(canvas.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)), COLOURS[i])
        # Every pixel of the box is the image's colour (resampling a flat colour).
        block = pixels[y0:y1, x0:x1].astype(int)
        assert np.abs(block - np.array(COLOURS[i])).max() <= 2
        # The label band above the tile holds black text.
        band = pixels[ty - margin : ty, tx : tx + tile]
        assert (band.max(axis=2) < 60).sum() >= 10, f"no label above tile {i + 1}"
        outside[y0:y1, x0:x1] = False
        outside[ty - margin : ty, tx : tx + tile] = False

    # Margins, unused tile area, and label bands' surroundings are pure white.
    assert (pixels[outside] == 255).all()
    return pixels


@pytest.mark.parametrize("n", sorted(GRID_LAYOUTS))
def test_grid_pixels_default_size(n: int) -> None:
    check_grid(n, tile=448, margin=40, font_px=36)


@pytest.mark.parametrize("n", sorted(GRID_LAYOUTS))
def test_grid_pixels_small_tile_label_clipped(n: int) -> None:
    # A 36 px font in an 8 px band must be clipped, never drawn over the tiles.
    check_grid(n, tile=64, margin=8, font_px=36)


def label_band(canvas: Image.Image, n: int, index0: int) -> np.ndarray:
    x, y = grid_tile_origin(index0, GRID_LAYOUTS[n][1], 448, 40)
    return np.asarray(canvas)[y - 40 : y, x : x + 448]


def test_grid_labels_numbered_row_major() -> None:
    canvas9, _ = compose_grid(grid_inputs(9))
    canvas2, _ = compose_grid(grid_inputs(2))
    # "Image1" looks the same wherever it is drawn, and differs from "Image2".
    assert np.array_equal(label_band(canvas9, 9, 0), label_band(canvas2, 2, 0))
    assert np.array_equal(label_band(canvas9, 9, 1), label_band(canvas2, 2, 1))
    assert not np.array_equal(label_band(canvas9, 9, 0), label_band(canvas9, 9, 1))
    assert len({label_band(canvas9, 9, i).tobytes() for i in range(9)}) == 9


@pytest.mark.parametrize(
    ("bg_size", "target_size"),
    [
        ((640, 480), (300, 100)),
        ((640, 480), (100, 300)),
        ((640, 480), (3, 5)),
        ((640, 480), (2000, 1000)),
        ((90, 91), (50, 50)),  # 0.7 * 90 = 62.999... in floating point
        ((333, 517), (640, 480)),
    ],
)
def test_pic_in_pic(bg_size: tuple[int, int], target_size: tuple[int, int]) -> None:
    bg_colour, target_colour = (10, 120, 40), (250, 30, 200)
    background = solid(bg_size, bg_colour)
    composite, (x0, y0, x1, y1) = compose_pic_in_pic(background, solid(target_size, target_colour))
    bw, bh = bg_size
    w, h = x1 - x0, y1 - y0
    assert composite.size == bg_size
    assert background.getpixel((bw // 2, bh // 2)) == bg_colour  # input left untouched

    limit_w, limit_h = math.floor(bw * 0.7 + 1e-9), math.floor(bh * 0.7 + 1e-9)
    assert w <= limit_w and h <= limit_h
    assert w == limit_w or h == limit_h
    tw, th = target_size
    assert abs(w - h * tw / th) <= 1 or abs(h - w * th / tw) <= 1
    assert abs((x0 + x1) / 2 - bw / 2) <= 1 and abs((y0 + y1) / 2 - bh / 2) <= 1
    assert (x0, y0) == ((bw - w) // 2, (bh - h) // 2)

    assert_colour(composite.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)), target_colour)
    for corner in [(0, 0), (bw - 1, 0), (0, bh - 1), (bw - 1, bh - 1)]:
        assert composite.getpixel(corner) == bg_colour
    pixels = np.asarray(composite)
    mask = np.ones(pixels.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = False
    assert (pixels[mask] == np.array(bg_colour)).all()
    assert np.abs(pixels[y0:y1, x0:x1].astype(int) - np.array(target_colour)).max() <= 2


def test_pic_in_pic_bad_scale() -> None:
    with pytest.raises(ValueError, match="scale"):
        compose_pic_in_pic(solid((10, 10), (0, 0, 0)), solid((4, 4), (1, 1, 1)), scale=1.5)


def gradient_image() -> Image.Image:
    # A non-flat image, so the encoders have real work (and real chances to vary).
    y, x = np.mgrid[0:97, 0:131]
    arr = np.stack([x * 2 % 256, y * 3 % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_encode_deterministic(fmt: str) -> None:
    images = [gradient_image(), *grid_inputs(3)]
    first = encode_image(compose_grid(images[:3])[0], fmt)  # type: ignore[arg-type]
    again = encode_image(compose_grid(images[:3])[0], fmt)  # type: ignore[arg-type]
    assert first == again
    decoded = Image.open(io.BytesIO(first))
    assert decoded.format == fmt.upper()
    assert decoded.size == grid_canvas_size(3)

    pip, _ = compose_pic_in_pic(images[1], images[0])
    assert encode_image(pip, fmt) == encode_image(pip.copy(), fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_encode_drops_metadata(fmt: str) -> None:
    plain = gradient_image()
    tagged = gradient_image()
    tagged.info.update({"icc_profile": b"not-a-real-profile", "dpi": (300, 300), "foo": "bar"})
    assert encode_image(tagged, fmt) == encode_image(plain, fmt)  # type: ignore[arg-type]
    assert "icc_profile" in tagged.info  # the caller's image is not modified


def test_encode_png_lossless_and_jpeg_close() -> None:
    img = gradient_image()
    png = Image.open(io.BytesIO(encode_image(img, "png")))
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(img))
    jpeg = Image.open(io.BytesIO(encode_image(img, "jpeg", quality=95)))
    assert jpeg.size == img.size
    assert jpeg.info.get("exif") is None
    err = np.abs(np.asarray(jpeg).astype(int) - np.asarray(img).astype(int)).mean()
    assert err < 8


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="format"):
        encode_image(gradient_image(), "webp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        encode_image(gradient_image(), "jpeg", quality=0)
