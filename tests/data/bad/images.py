"""The corpus's images, built from Pillow and bytes at run time: valid ones in every
mode the loader must handle, and broken ones (truncated, corrupt, lying about their
size, not images at all, a FIFO, a symlink out of the root)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def png(im: Image.Image, **kw: Any) -> bytes:
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


def write_images(root: Path, outside: Path) -> dict[str, str]:
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
        valid[put(f"coco/ok-{i}.png", png(Image.new("RGB", s, c)))] = "RGB PNG"
    for i in range(3):
        jpeg = _encode(_noise((64 + 8 * i, 56), seed=i), "JPEG", quality=80)
        valid[put(f"coco/ok-{i}.jpg", jpeg)] = "RGB JPEG"
    misnamed = _encode(Image.new("RGB", (40, 40), (10, 90, 60)), "JPEG")
    valid[put("coco/misnamed.png", misnamed)] = "a JPEG named .png"

    modes = "coco/modes"
    cmyk = _encode(Image.new("CMYK", (64, 48), (0, 200, 100, 30)), "JPEG")
    valid[put(f"{modes}/cmyk.jpg", cmyk)] = "CMYK JPEG"
    valid[put(f"{modes}/gray16.png", png(Image.new("I;16", (48, 64), 40000)))] = "16-bit PNG"
    tiff16 = _encode(Image.new("I;16B", (40, 40), 1234), "TIFF")
    valid[put(f"{modes}/gray16be.tif", tiff16)] = "16-bit big-endian TIFF"
    pal = Image.new("P", (56, 56), 1)
    pal.putpalette([255, 0, 0, 0, 128, 255] + [0] * 762)
    valid[put(f"{modes}/palette.png", png(pal, transparency=0))] = "palette PNG, transparency"
    rgba = Image.new("RGBA", (64, 64), (200, 50, 120, 128))
    valid[put(f"{modes}/rgba.png", png(rgba))] = "RGBA PNG, half transparent"
    valid[put(f"{modes}/la.png", png(Image.new("LA", (40, 60), (90, 200))))] = "LA PNG"
    valid[put(f"{modes}/onebit.png", png(Image.new("1", (33, 33), 1)))] = "1-bit PNG"
    frames = [Image.new("P", (40, 40), i) for i in (3, 7)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50)
    valid[put(f"{modes}/anim.gif", gif.getvalue())] = "two-frame GIF"

    bad = "coco/bad"
    put(f"{bad}/empty.png", b"")
    noisy = png(_noise((64, 64), seed=7))
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
    put(f"{bad}/header-only.png", png(Image.new("RGB", (64, 64)))[:33])  # signature + IHDR
    tiny = png(Image.new("RGB", (1, 1), (255, 0, 0)))
    put(f"{bad}/bomb.png", _patch_png_size(tiny, 100_000, 100_000))
    put(f"{bad}/bomb-under-pil.png", _patch_png_size(tiny, 4_000, 4_000))  # 16 MP
    put(f"{bad}/big.jpg", _encode(Image.new("RGB", (1100, 1000), (30, 30, 90)), "JPEG"))
    put(f"{bad}/one-pixel.png", tiny)
    put(f"{bad}/thin.png", png(Image.new("RGB", (4, 200), (0, 0, 0))))
    (root / bad / "a-directory.png").mkdir()
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / bad / "fifo.png")
    (outside / "secret.png").write_bytes(png(Image.new("RGB", (32, 32), (1, 2, 3))))
    (root / bad / "escape").symlink_to(os.path.relpath(outside, root / bad))
    put("solo/only.png", png(Image.new("RGB", (32, 32), (5, 6, 7))))
    return valid
