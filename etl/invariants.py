"""Invariants of the bucketed output, checked before anything downstream may read it."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image


def bucketed_violations(table: pa.Table, resolution: int, multiple: int = 16) -> dict[str, list[str]]:
    """Keys that break each invariant (empty lists when the shard is sound)."""
    heights = table["height"].to_pylist()
    widths = table["width"].to_pylist()
    keys = table["key"].to_pylist()
    found: dict[str, list[str]] = {
        "side_not_multiple": [],
        "long_side_over_resolution": [],
        "image_mismatch": [],
        "empty_caption": [],
        "duplicate_key": [],
    }
    for key, h, w, data in zip(keys, heights, widths, table["image"].to_pylist()):
        if h % multiple or w % multiple or h <= 0 or w <= 0:
            found["side_not_multiple"].append(key)
        if max(h, w) > resolution:
            found["long_side_over_resolution"].append(key)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # the whole image, not only its header: a truncated body must not reach training
                if img.size != (w, h) or img.mode != "RGB":
                    found["image_mismatch"].append(key)
        except (OSError, Image.DecompressionBombError):  # UnidentifiedImageError is an OSError
            found["image_mismatch"].append(key)
    for column in ("recaption", "recaption_short"):
        stripped = pc.utf8_trim_whitespace(pc.fill_null(table[column], ""))
        empty = pc.equal(pc.utf8_length(stripped), 0)
        found["empty_caption"] += pc.filter(table["key"], empty).to_pylist()
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            found["duplicate_key"].append(key)
        seen.add(key)
    return found
