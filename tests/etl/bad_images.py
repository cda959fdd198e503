"""Awkward and broken image files, as the bytes a web server would send.

``BAD_IMAGES`` maps a name to (bytes, content_type, expected outcome of ``filter_shard`` with the default
``FilterConfig``): "kept" or the rejection reason. The end-to-end test serves the same bytes over HTTP.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import warnings
import zlib

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from etl.schema import CANONICAL, conform

# Upright size of every image that should survive the filter (min_side 64): portrait, not square,
# so a swapped (height, width) shows up.
UPRIGHT_WIDTH, UPRIGHT_HEIGHT = 96, 144
MARKER = (255, 0, 0)  # top-left corner block of the upright picture


def _picture(mode: str = "RGB", size: tuple[int, int] = (UPRIGHT_WIDTH, UPRIGHT_HEIGHT)) -> Image.Image:
    """A smooth gradient with a red block in the top-left corner, so orientation is checkable."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 128)], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    ImageDraw.Draw(img).rectangle([0, 0, width // 4, height // 4], fill=MARKER)
    return img.convert(mode)


def _save(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    return _save(_picture("CMYK"), "JPEG", quality=95)


def grey16_png() -> bytes:
    ramp = (np.arange(UPRIGHT_WIDTH * UPRIGHT_HEIGHT, dtype=np.uint32) * 7 % 65536).astype(np.uint16)
    return _save(Image.fromarray(ramp.reshape(UPRIGHT_HEIGHT, UPRIGHT_WIDTH)), "PNG")


def palette_png_with_transparency() -> bytes:
    img = _picture().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    img = _picture("RGBA")
    alpha = Image.new("L", img.size, 255)
    ImageDraw.Draw(alpha).rectangle([0, UPRIGHT_HEIGHT // 2, UPRIGHT_WIDTH, UPRIGHT_HEIGHT], fill=0)
    img.putalpha(alpha)  # bottom half fully transparent: must come out white
    return _save(img, "PNG")


def animated_gif() -> bytes:
    frames = [_picture(), Image.new("RGB", (UPRIGHT_WIDTH, UPRIGHT_HEIGHT), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def webp() -> bytes:
    return _save(_picture(), "WEBP", quality=90)


def exif_rotated_jpeg() -> bytes:
    """Stored lying on its side (144 wide, 96 high) with orientation 6: displayed upright, 96 x 144."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = _picture().transpose(Image.Transpose.ROTATE_90)  # the inverse: 90 degrees counter-clockwise
    return _save(stored, "JPEG", quality=95, exif=exif.tobytes())


def exif_rotated_tiff() -> bytes:
    """The same as a TIFF, which Pillow (11.1+) reports upright already and turns upright as it loads."""
    stored = _picture().transpose(Image.Transpose.ROTATE_90)
    return _save(stored, "TIFF", tiffinfo={0x0112: 6})


def one_pixel_png() -> bytes:
    return _save(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


def sliver_png() -> bytes:
    return _save(_picture(size=(4000, 40)), "PNG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int = 20000) -> bytes:
    """A valid side x side 1-bit PNG of zeros, written by hand: ~50 KB, made without a big buffer."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return random.Random(0).randbytes(4096)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="200" height="300"><rect width="200" height="300" fill="red"/></svg>'
HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"

BAD_IMAGES: dict[str, tuple[bytes, str, str]] = {
    "cmyk_jpeg": (cmyk_jpeg(), "image/jpeg", "kept"),
    "grey16_png": (grey16_png(), "image/png", "kept"),
    "palette_transparent_png": (palette_png_with_transparency(), "image/png", "kept"),
    "rgba_png": (rgba_png(), "image/png", "kept"),
    "animated_gif": (animated_gif(), "image/gif", "kept"),
    "webp": (webp(), "image/webp", "kept"),
    "exif_rotated_jpeg": (exif_rotated_jpeg(), "image/jpeg", "kept"),
    "exif_rotated_tiff": (exif_rotated_tiff(), "image/tiff", "kept"),
    "one_pixel_png": (one_pixel_png(), "image/png", "too_small"),
    "sliver_png": (sliver_png(), "image/png", "too_small"),
    "bomb_png": (bomb_png(), "image/png", "decompression_bomb"),
    # 10000 x 10000 is over the limit but under twice it, where Pillow only warns.
    "bomb_warning_png": (bomb_png(10000), "image/png", "decompression_bomb"),
    "truncated_jpeg": (truncated_jpeg(), "image/jpeg", "undecodable"),
    "zero_bytes": (b"", "image/jpeg", "undecodable"),
    "random_bytes": (random_bytes(), "image/jpeg", "undecodable"),
    "svg": (SVG, "image/svg+xml", "undecodable"),
    "html": (HTML, "text/html", "undecodable"),
}


def canonical_table(images: dict[str, bytes], **columns) -> pa.Table:
    """A CANONICAL shard of ``images`` (key -> bytes) as the download stage writes it; ``columns`` override."""
    keys = list(images)
    sizes = []
    for data in images.values():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                sizes.append(Image.open(io.BytesIO(data)).size)
        except (OSError, Image.DecompressionBombError):  # the download stage records what it could read; broken files get no size
            sizes.append((None, None))
    rows = {
        "key": keys,
        "url": [f"http://127.0.0.1/{key}" for key in keys],
        "caption": [f"a picture called {key}" for key in keys],
        "image": list(images.values()),
        "width": [w for w, _ in sizes],
        "height": [h for _, h in sizes],
        "original_width": [w for w, _ in sizes],
        "original_height": [h for _, h in sizes],
        "source": ["test"] * len(keys),
        "sha256": [hashlib.sha256(data).hexdigest() for data in images.values()],
    }
    rows.update(columns)
    return conform(pa.table(rows), CANONICAL)
