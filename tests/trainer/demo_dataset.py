"""Builds a real bucketed demo dataset for trainer tests, without Dagster or HTTP.

The same steps as the pipeline after the download: ``etl.demo_source`` draws the images (read back from
the files it writes), they become canonical rows, the alt-text captioner fills both captions,
``etl.buckets.bucket_shard`` resizes them into buckets, and ``etl.index.build_index`` indexes the shards.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
from PIL import Image

from etl.buckets import bucket_shard, write_bucketed
from etl.config import BucketConfig
from etl.demo_source import make_demo_source
from etl.index import build_index
from etl.layout import DataLayout
from etl.recaption.backends import AltTextCaptioner
from etl.recaption.postprocess import clean_alt_text
from etl.schema import CANONICAL, conform
from etl.storage import read_parquet, write_parquet_atomic

SOURCE = "demo"
SHARDS = 2  # more than one, so readers must keep several shard files apart


def _canonical_rows(source_dir: Path, urls: pa.Table, first_row: int) -> pa.Table:
    captioner = AltTextCaptioner()
    alt_texts = urls["caption"].to_pylist()
    detailed = captioner.detailed([], [clean_alt_text(text) for text in alt_texts])  # as caption_rows passes them
    columns: dict[str, list] = {name: [] for name in ("key", "url", "image", "width", "height", "sha256")}
    for offset, url in enumerate(urls["url"].to_pylist()):
        path = source_dir / "images" / url.rsplit("/", 1)[1]
        data = path.read_bytes()
        with Image.open(path) as img:
            width, height = img.size
        columns["key"].append(f"{SOURCE}-{first_row + offset:09d}")
        columns["url"].append(url)
        columns["image"].append(data)
        columns["width"].append(width)
        columns["height"].append(height)
        columns["sha256"].append(hashlib.sha256(data).hexdigest())
    table = pa.table(
        {
            **columns,
            "caption": alt_texts,
            "original_width": columns["width"],
            "original_height": columns["height"],
            "source": [SOURCE] * urls.num_rows,
            "recaption": detailed,
            "recaption_short": captioner.shorten(detailed),
        }
    )
    return conform(table, CANONICAL)


def build_demo_dataset(root: Path, n: int = 48, resolution: int = 64, seed: int = 0) -> Path:
    """Write ``root/buckets/<resolution>/*.parquet`` and ``root/index/<resolution>.parquet``; returns ``root``."""
    root = Path(root)
    layout = DataLayout(root)
    source_dir = root / "source"
    urls = read_parquet(make_demo_source(source_dir, n, "http://127.0.0.1:0", seed=seed))
    per_shard = -(-n // SHARDS)
    cfg = BucketConfig(resolutions=[resolution])
    shard_paths = []
    for shard_number, start in enumerate(range(0, n, per_shard)):
        rows = _canonical_rows(source_dir, urls.slice(start, per_shard), start)
        result = bucket_shard(rows, resolution, cfg)
        if result.rejects.num_rows:
            raise RuntimeError(f"demo images rejected by bucketing: {result.counts}")
        shard_paths.append(write_bucketed(result.kept, layout.bucketed(resolution, f"{shard_number:05d}")))
    write_parquet_atomic(build_index(shard_paths), layout.index(resolution))
    return root
