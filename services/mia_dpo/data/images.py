"""Images: decoding untrusted bytes, the one loader every stage reads images with,
and the square padding LLaVA-1.5 applies before its processor.

Anything wrong with one image raises `SampleError(reason, detail)`, so the caller
counts it under `reason` and moves on.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections import OrderedDict
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from mia_dpo.data.source import resolve_image
from mia_dpo.errors import NotFound, SampleError

# Formats a LLaVA mix actually contains. Anything else (EPS would shell out to
# Ghostscript, for one) is refused before any plugin gets to parse it.
SAFE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# PIL reads LOAD_TRUNCATED_IMAGES as a module global at load() time, and any library
# may have set it to True. We force it off around our own loads; the lock keeps two
# threads from restoring each other's value in the wrong order.
_STRICT_LOAD = threading.Lock()


class BlobSource(Protocol):
    """Where image bytes come from (the runtime's BlobReader): raises NotFound."""

    def read(self, uri: str) -> bytes: ...


class ImageLoader:
    """Reads and decodes images, the one way every stage does it.

    With `root` the references are source-relative paths (the input index's `image`
    field) resolved under `root`; without it they are URIs a record already holds.
    `capacity` > 0 keeps that many recent results (the same distractors come up again
    and again within a shard); failures are remembered too, so a broken image is
    reported once per shard, not decoded again for every sample that draws it.
    A source file the store cannot read is that sample's problem (`image_unreadable`);
    for a record's URI the store error propagates, since our own output must exist.
    """

    def __init__(
        self,
        blobs: BlobSource,
        max_pixels: int,
        min_side: int = 1,
        *,
        root: str | None = None,
        capacity: int = 0,
    ) -> None:
        self.blobs, self.max_pixels, self.min_side = blobs, max_pixels, min_side
        self.root, self.capacity = root, capacity
        self._cache: OrderedDict[str, Image.Image | SampleError] = OrderedDict()

    def uri(self, ref: str) -> str:
        return resolve_image(self.root, ref) if self.root is not None else ref

    def load(self, ref: str) -> Image.Image:
        hit = self._cache.get(ref)
        if hit is None:
            hit = self._load(ref)
            if self.capacity > 0:
                self._cache[ref] = hit
                if len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(ref)
        if isinstance(hit, SampleError):
            raise hit
        return hit

    def load_all(self, refs: list[str], label: str) -> list[Image.Image]:
        """Every image of one record; a missing one is named with the record's `label`."""
        images = []
        for ref in refs:
            try:
                images.append(self.load(ref))
            except SampleError as e:
                if e.reason != "image_missing" or self.root is not None:
                    raise
                raise SampleError("image_missing", f"{label}: {ref} not found") from None
        return images

    def _load(self, ref: str) -> Image.Image | SampleError:
        try:
            uri = self.uri(ref)
            try:
                data = self.blobs.read(uri)
            except NotFound:
                where = f" under {self.root}" if self.root is not None else ""
                return SampleError("image_missing", f"image {ref}: not found{where}")
            except OSError as e:
                if self.root is None:
                    # A record's own URI: the store failed, not the image. The task is
                    # retried (or dead-lettered), never silently short of a sample.
                    raise
                return SampleError("image_unreadable", f"image {ref}: {e}")
            return decode_image(data, ref, self.max_pixels, self.min_side)
        except SampleError as e:
            return e


def pad_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas, so the processor's crop cuts nothing."""
    side = max(img.size)
    if img.width == img.height:
        return img
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def decode_image(data: bytes, name: str, max_pixels: int, min_side: int) -> Image.Image:
    """Decode to a fully loaded, upright RGB image, checking its size before decoding."""
    if not data:
        raise SampleError("image_empty", f"{name}: image file is empty")
    with _STRICT_LOAD, warnings.catch_warnings():
        # PIL's own bomb guard (about 89M pixels) stays a ceiling above max_pixels.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im = _open_checked(data, name, max_pixels, min_side)
            try:
                im.load()  # first frame only: open() leaves a multi-frame file on frame 0
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise SampleError("image_too_large", f"{name}: {e}") from None
            except (OSError, SyntaxError, ValueError, EOFError) as e:
                reason = "image_truncated" if "truncat" in str(e).lower() else "image_unreadable"
                raise SampleError(reason, f"{name}: cannot decode pixels: {e}") from None
        except SampleError as e:
            raise _truncated_if_cut_short(e, data, name) from None
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved
    # A corrupt EXIF block leaves the pixels usable as stored, so it is not a drop reason.
    with contextlib.suppress(Exception):
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im, name)


def _open_checked(data: bytes, name: str, max_pixels: int, min_side: int) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=SAFE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        detail = f"{name}: not an image in a supported format {SAFE_FORMATS}"
        raise SampleError("image_unreadable", detail) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SampleError("image_unreadable", f"{name}: bad image header: {e}") from None
    width, height = im.size  # from the header; no pixel has been decoded yet
    size = f"{name}: {width}x{height}"
    if width * height > max_pixels:
        raise SampleError("image_too_large", f"{size} exceeds {max_pixels} pixels")
    if min(width, height) < min_side:
        raise SampleError("image_too_small", f"{size} has a side under {min_side} px")
    return im


def _truncated_if_cut_short(err: SampleError, data: bytes, name: str) -> SampleError:
    """PIL often reports a file cut inside its header as unidentified or corrupt; a file
    that starts like a known format but lacks its end (or declared length) was cut."""
    fmt = _cut_short(data) if err.reason == "image_unreadable" else None
    if fmt is None:
        return err
    why = err.detail.removeprefix(f"{name}: ")
    return SampleError(
        "image_truncated", f"{name}: {fmt} file cut short at {len(data)} bytes ({why})"
    )


def _cut_short(data: bytes) -> str | None:
    """The format of an image file that stops before its end marker or declared size."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in data else "PNG"
    if data.startswith(b"\xff\xd8"):
        # The entropy-coded data escapes 0xFF, so an EOI after the last SOS ends the scan.
        sos = data.rfind(b"\xff\xda")
        return None if sos >= 0 and data.rfind(b"\xff\xd9") > sos else "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return None if data.rstrip(b"\0\r\n")[-1:] == b";" else "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP" if len(data) < int.from_bytes(data[4:8], "little") + 8 else None
    if data[:2] == b"BM" and len(data) >= 6:
        return "BMP" if len(data) < int.from_bytes(data[2:6], "little") else None
    return None


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    mode = im.mode
    try:
        if mode == "RGB" and "transparency" not in im.info:
            return im
        if mode.startswith("I") or mode == "F":
            return Image.fromarray(_deep_to_uint8(np.asarray(im))).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in im.info:
            # Transparent pixels hide arbitrary colour underneath; show them as white paper.
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")  # 1, L, P, CMYK, YCbCr
    except (ValueError, OSError) as e:
        raise SampleError("image_unreadable", f"{name}: cannot convert mode {mode}: {e}") from None


def _deep_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale >8-bit grayscale to 0..255 by value range, never by clipping."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(arr * 255.0).astype(np.uint8)
        span = hi - lo or 1.0
        return np.rint((arr - lo) * (255.0 / span)).astype(np.uint8)
    wide = arr.astype(np.int64)
    lo, hi = int(wide.min()), int(wide.max())
    if lo >= 0 and hi <= 65535:
        # 16-bit data (PNG/TIFF), whether PIL holds it as I;16 or widened to I.
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    span = hi - lo or 1
    return ((wide - lo) * 255 // span).astype(np.uint8)
