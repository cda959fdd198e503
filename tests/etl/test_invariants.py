"""The bucketed output's invariants: each broken one names the rows that break it."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from etl.invariants import bucketed_violations


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_violation_names_its_rows_and_a_sound_row_none():
    good = _png((64, 32))  # (width, height)
    rows = [
        ("sound", good, 32, 64, "a caption"),
        ("cut-short", good[: len(good) // 2], 32, 64, "its header says 64x32, its body ends early"),
        ("not-an-image", b"<html>", 32, 64, "not an image"),
        ("grey", _png((64, 32), "L"), 32, 64, "grey"),
        ("wrong-size", good, 32, 48, "recorded 48 wide"),
        ("odd-side", _png((40, 32)), 32, 40, "40 wide"),
        ("too-big", _png((96, 32)), 32, 96, "96 wide at 64"),
        ("no-caption", good, 32, 64, "  "),
        ("sound", good, 32, 64, "again"),
    ]
    table = pa.table({
        "key": [r[0] for r in rows], "image": [r[1] for r in rows], "height": [r[2] for r in rows],
        "width": [r[3] for r in rows], "recaption": [r[4] for r in rows], "recaption_short": ["short"] * len(rows),
    })
    assert bucketed_violations(table, resolution=64) == {
        "side_not_multiple": ["odd-side"],
        "long_side_over_resolution": ["too-big"],
        "image_mismatch": ["cut-short", "not-an-image", "grey", "wrong-size"],
        "empty_caption": ["no-caption"],
        "duplicate_key": ["sound"],
    }
