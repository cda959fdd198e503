"""Bucket resize: each image to its aspect-ratio bucket at a maximum resolution, upright RGB, re-encoded.

A bucket is (height, width), both multiples of ``multiple`` (patch 2 x VAE 8 = 16), long side <= the
resolution, never upscaled. Speed comes from decoding less, not from parallelism (Dagster already runs
partitions in parallel): a JPEG decodes at a reduced DCT scale (``Image.draft``) when the bucket is much
smaller, other formats shrink by cheap integer box reduction (``resize(reducing_gap=...)``) before the
final LANCZOS, and the encoders run at a lower effort setting.
"""

from __future__ import annotations

import hashlib
import io
from fractions import Fraction
from math import floor

import numpy as np
import pyarrow as pa
from PIL import Image

from etl.config import BucketConfig
from etl.images import ImageRejected, decode, open_image, oriented_size, to_rgb
from etl.index import INDEX_COLUMNS
from etl.schema import CANONICAL, StepResult, conform, make_rejects
from etl.storage import write_parquet_atomic

# A JPEG decodes at a DCT scale no smaller than DRAFT_GAP x the bucket, other formats box-reduce down to
# REDUCING_GAP x the bucket, then LANCZOS finishes. Measured on photo-like 1-4 MP JPEGs at 256: draft gap
# 1.5 stays >= 43 dB PSNR against a full-resolution LANCZOS while 1.25 drops to 33 dB
# (benchmarks/bucket_resize.py, docs/benchmarks.md, "Bucket resize").
DRAFT_GAP = 1.5
REDUCING_GAP = 2.0
# Encoder effort: zlib level 1 encodes a 256 px PNG ~2.2x faster than Pillow's default 6 for ~10% more
# bytes; WebP method 2 is ~1.7x faster than the default 4 at the same size and quality setting.
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 2
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# The trainer reads random single rows, and parquet decodes a whole row group to give one: a group holds
# about ROW_GROUP_BYTES of images (within ROW_GROUP_ROWS), so a read costs megabytes, not the 60 MB that
# 128 rows of 512 px PNGs are. More groups cost footer, which statistics dominate: only the bucket sizes
# keep theirs (nothing reads the others). Images skip zstd: it gains under 1% on PNG/JPEG/WebP bytes and
# costs a pass over every group read. Measured in benchmarks/bucket_reads.py (docs/benchmarks.md).
# The index build's columns (key, height, width) skip it too: a few hundred bytes a group, where Arrow's
# zstd set-up per column chunk made the build 2.1-3.4x slower (benchmarks/index_build.py --layouts).
ROW_GROUP_BYTES = 8 * 2**20
ROW_GROUP_ROWS = (4, 128)


def bucket_size(height: int, width: int, resolution: int, multiple: int = 16) -> tuple[int, int] | None:
    """(height, width) of the bucket for an image of that size, or None when a side would round to 0."""
    scale = min(Fraction(1), Fraction(resolution, max(height, width)))
    sides = []
    for side in (height, width):
        target = side * scale  # exact, so a side exactly at a multiple never rounds the wrong way
        nearest = floor(target / multiple + Fraction(1, 2)) * multiple
        if nearest > side or nearest > resolution:  # never upscaled: a few stretched pixels are blur to learn
            nearest = floor(target / multiple) * multiple
        if nearest == 0:
            return None
        sides.append(nearest)
    return sides[0], sides[1]


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    """``fmt`` is png | jpeg | webp; ``quality`` applies to jpeg and webp."""
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {sorted(_PIL_FORMATS)}")
    params = {
        "png": {"compress_level": PNG_COMPRESS_LEVEL},
        "jpeg": {"quality": quality},
        "webp": {"quality": quality, "method": WEBP_METHOD},
    }[fmt]
    buffer = io.BytesIO()
    img.save(buffer, _PIL_FORMATS[fmt], **params)
    return buffer.getvalue()


def resize_to_bucket(data: bytes, resolution: int, multiple: int = 16) -> Image.Image:
    """Decode ``data`` and return the upright RGB image at its bucket size; raises ``ImageRejected``."""
    img = open_image(data)
    width, height = oriented_size(img)
    bucket = bucket_size(height, width, resolution, multiple)
    if bucket is None:
        raise ImageRejected(
            "too_small_for_bucket", f"{width}x{height} (w x h) has a side under {multiple} px at resolution {resolution}"
        )
    bucket_height, bucket_width = bucket
    draft_at_least = (int(bucket_width * DRAFT_GAP), int(bucket_height * DRAFT_GAP))
    rgb = to_rgb(decode(img, at_least=draft_at_least))
    if rgb.size == (bucket_width, bucket_height):
        return rgb
    return rgb.resize((bucket_width, bucket_height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def bucket_stage(resolution: int) -> str:
    """The stage name of bucketing at one resolution: its rejects' stage and folder."""
    return f"bucket_{resolution}"


def bucket_shard(table: pa.Table, resolution: int, cfg: BucketConfig) -> StepResult:
    """Every row resized into its bucket and re-encoded in ``cfg.format``; width/height = the bucket."""
    images, widths, heights, kept_rows = [], [], [], []
    reject_rows, reasons, details = [], [], []
    for i, data in enumerate(table["image"]):  # one row's bytes at a time, not the whole shard
        try:
            resized = resize_to_bucket(data.as_py() or b"", resolution, cfg.multiple)
        except ImageRejected as err:
            reject_rows.append(i)
            reasons.append(err.reason)
            details.append(err.detail)
            continue
        images.append(encode_image(resized, cfg.format, cfg.quality))
        widths.append(resized.width)
        heights.append(resized.height)
        kept_rows.append(i)

    # The original bytes are dropped before the take so the kept rows never copy them.
    kept = conform(table.drop_columns(["image"]), CANONICAL).take(pa.array(kept_rows, pa.int64()))
    for name, values in (("image", images), ("width", widths), ("height", heights)):
        index = kept.schema.get_field_index(name)
        kept = kept.set_column(index, kept.schema.field(index), pa.array(values, kept.schema.field(index).type))
    rejects = make_rejects(
        table["key"].take(pa.array(reject_rows, pa.int64())).to_pylist(),
        table["url"].take(pa.array(reject_rows, pa.int64())).to_pylist(),
        bucket_stage(resolution),
        reasons,
        details,
    )
    return StepResult(kept=kept, rejects=rejects)


def row_group_rows(table: pa.Table, row_group_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per row group of a bucketed shard: about ``row_group_bytes`` of its images."""
    if table.num_rows == 0:
        return ROW_GROUP_ROWS[1]
    mean_bytes = max(1, table["image"].nbytes // table.num_rows)
    return min(max(round(row_group_bytes / mean_bytes), ROW_GROUP_ROWS[0]), ROW_GROUP_ROWS[1])


def bucket_order(table: pa.Table) -> np.ndarray:
    """Row order of a bucketed shard: by bucket (height, width), then by a hash of the key.

    A row group then holds rows of one bucket (two at a boundary), so the trainer's ``row_groups`` shuffle
    can take a whole group into one batch; and rows that were neighbours in the source, often images of
    one web page, spread over the bucket's groups. The hash is blake2b, not a library's row hash, so the
    order (and the dataset version built from it) is the same with any polars or pyarrow version."""
    keys = table["key"].to_pylist()
    spread = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                      dtype=np.uint64)
    return np.lexsort((spread, table["width"].to_numpy(), table["height"].to_numpy()))


def write_bucketed(table: pa.Table, path, row_group_bytes: int = ROW_GROUP_BYTES):
    """A bucketed shard, sorted by ``bucket_order`` and laid out for the trainer's reads of a few rows
    at a time (see ROW_GROUP_BYTES)."""
    ordered = table.take(pa.array(bucket_order(table), pa.int64()))
    return write_parquet_atomic(ordered, path, row_group_size=row_group_rows(table, row_group_bytes),
                                uncompressed=("image", *INDEX_COLUMNS), statistics=("height", "width"))
