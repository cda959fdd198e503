"""Decoding of downloaded image bytes, shared by the filter and the bucket resize.

Pillow's decompression-bomb limit stays on (``Image.MAX_IMAGE_PIXELS``) and truncated files stay errors
(``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set): a bad image becomes an ``ImageRejected`` with a
reason word, never a crash and never a silently half-grey picture.
"""

from __future__ import annotations

import io
import struct
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image, ImageOps, JpegImagePlugin

WHITE = (255, 255, 255)

# What Pillow may raise on malformed input (the list Pillow's own fuzzers accept as "handled").
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)

# EXIF orientations whose transpose swaps width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is the rejection word, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@contextmanager
def _rejecting(step: str):
    """Turn Pillow's errors into rejections; a bomb warning counts as a bomb."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the pixel limit, and raises above 2x.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRejected("decompression_bomb", str(err)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageRejected("undecodable", f"{step}: not a recognised image format") from err
    except _DECODE_ERRORS as err:
        raise ImageRejected("undecodable", f"{step}: {type(err).__name__}: {err}") from err


def open_image(data: bytes) -> Image.Image:
    """Read the header only; a file over Pillow's pixel limit is a ``decompression_bomb``."""
    if not data:
        raise ImageRejected("undecodable", "empty file (0 bytes)")
    with _rejecting(f"open (file starts with {data[:16]!r})"):
        return Image.open(io.BytesIO(data))


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied; needs no decode."""
    width, height = img.size
    if img.format == "TIFF" and getattr(img, "_tile_size", img.size) != img.size:
        # Pillow (11.1+) reports a TIFF's size upright already, and turns its pixels upright as it loads them.
        # Its stored size is only in a private attribute; without it (older Pillow) the size is as stored.
        return width, height
    with _rejecting("read EXIF"):
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def decode(img: Image.Image, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode the whole file (first frame); truncated or corrupt data is ``undecodable``.

    ``at_least`` = (width, height) in displayed orientation lets a JPEG decode at a reduced DCT scale
    (``Image.draft``) no smaller than that: the decoder still reads every byte of the stream, so a
    truncation is still caught, but skips most of the inverse-DCT and colour work.
    """
    if at_least is not None and isinstance(img, JpegImagePlugin.JpegImageFile):  # JPEG and MPO
        width, height = at_least
        if oriented_size(img) != img.size:
            width, height = height, width
        img.draft(img.mode, (max(1, width), max(1, height)))
    with _rejecting(f"decode {img.format}"):
        img.load()
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, alpha composited on white, any mode converted."""
    with _rejecting(f"convert {img.mode} to RGB"):
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode.startswith("I;16") or img.mode == "I":
            img = _wide_grey_to_l(img)
        elif img.mode == "F":
            img = _float_grey_to_l(img)
        if img.has_transparency_data:
            rgba = img.convert("RGBA")
            background = Image.new("RGB", rgba.size, WHITE)
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return img if img.mode == "RGB" else img.convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    # Pillow's own I;16 -> L conversion clips everything above 255 to white instead of rescaling,
    # so a 16-bit photo would come out blown out; keep the top 8 bits instead. 16-bit PNGs may also
    # open as 32-bit "I" holding 0..65535, hence the clip.
    raw = np.asarray(img, dtype=np.int64)
    grey = Image.fromarray((np.clip(raw, 0, 65535) >> 8).astype(np.uint8))
    transparent = img.info.get("transparency")  # a PNG's tRNS: the one 16-bit value that is see-through
    if isinstance(transparent, int):
        grey.putalpha(Image.fromarray(np.where(raw == transparent, 0, 255).astype(np.uint8)))
    return grey


def _float_grey_to_l(img: Image.Image) -> Image.Image:
    # 32-bit float TIFFs hold 0..1 (or, less often, 0..255); Pillow's conversion truncates 0..1 to black.
    pixels = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
