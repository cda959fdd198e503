"""What one random image costs a loader's DataLoader worker, by how bucket shards are laid out.

The bucket sampler draws rows at random over all shards, so a worker reads each image from a different
row group, and parquet reads whole row groups: one image costs decompressing and copying its whole row
group's image column. Shards of photo-like PNGs (the pipeline's default bucket format) are written in
several layouts and read through the real ``trainer.data.BucketBatches`` in random batches, in this
process; the index build (``etl.index.build_index``) and the footer that every worker keeps per open
shard are measured on the same files, because they grow with the number of row groups.

    .venv/bin/python benchmarks/bucket_reads.py                      # 256 and 512 px, about 2 minutes
    .venv/bin/python benchmarks/bucket_reads.py --resolutions 256 --rows 2048
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from benchmarks.bucket_resize import photo_like
from etl.buckets import ROW_GROUP_BYTES, encode_image, write_bucketed
from etl.index import build_index
from etl.layout import DataLayout
from etl.schema import CANONICAL, conform
from etl.storage import write_parquet_atomic
from trainer.data import BucketBatches, decode_image


def photo_pngs(count: int, resolution: int, seed: int = 0) -> tuple[list[bytes], list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    sizes = [(resolution, resolution), (resolution * 3 // 4, resolution), (resolution, resolution * 3 // 4)]
    images, shapes = [], []
    for i in range(count):
        height, width = sizes[i % len(sizes)]
        images.append(encode_image(photo_like(width, height, rng), "png", 95))
        shapes.append((height, width))
    return images, shapes


def canonical_rows(images: list[bytes], shapes: list[tuple[int, int]]) -> pa.Table:
    n = len(images)
    return conform(pa.table({
        "key": [f"bench-{i:09d}" for i in range(n)], "url": [f"http://example.com/{i}.jpg" for i in range(n)],
        "caption": ["an alt text of a few words"] * n, "image": images,
        "height": pa.array([h for h, _ in shapes], pa.int32()), "width": pa.array([w for _, w in shapes], pa.int32()),
        "original_height": pa.array([2 * h for h, _ in shapes], pa.int32()),
        "original_width": pa.array([2 * w for _, w in shapes], pa.int32()),
        "source": ["bench"] * n, "sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "recaption": ["a detailed caption that describes the picture in a few sentences. " * 4] * n,
        "recaption_short": ["a short caption of the picture"] * n,
    }), CANONICAL)


def layouts() -> dict[str, object]:
    """name -> a writer (table, path) -> path: the layout before, and write_bucketed at three targets."""
    def bucketed(target_mib: int):
        return lambda table, path: write_bucketed(table, path, row_group_bytes=target_mib * 2**20)

    return {
        "before: 128 rows, all zstd, all statistics": lambda table, path: write_parquet_atomic(table, path, row_group_size=128),
        **{f"write_bucketed, ~{mib} MiB groups" + (" (default)" if mib * 2**20 == ROW_GROUP_BYTES else ""): bucketed(mib)
           for mib in (32, 8, 2)},
    }


def measure(table: pa.Table, resolution: int, folder: Path, write, batches: int, batch_size: int,
            rng: np.random.Generator) -> dict:
    path = write(table, DataLayout(folder).bucketed(resolution, "00000"))
    meta = pq.ParquetFile(path).metadata
    index_s = open_s = float("inf")
    for _ in range(3):  # the least disturbed of three
        started = time.perf_counter()
        index = build_index([path])
        index_s = min(index_s, time.perf_counter() - started)
        fresh = BucketBatches(folder, resolution, index, 0.5, 0)
        started = time.perf_counter()
        fresh._open(path.name)  # a worker's first read of a shard, or a read after it left OPEN_SHARDS
        open_s = min(open_s, time.perf_counter() - started)
    dataset = BucketBatches(folder, resolution, index, detailed_caption_prob=0.5, seed=0)
    buckets = {}
    for i, (h, w) in enumerate(zip(index["height"].to_numpy(), index["width"].to_numpy())):
        buckets.setdefault((h, w), []).append(i)
    pools = [rows for rows in buckets.values() if len(rows) >= batch_size]
    dataset[pools[0][:batch_size]]  # opens the shard (its footer parse) outside the timing
    cpu = 0.0
    for b in range(batches):
        rows = list(rng.choice(pools[b % len(pools)], batch_size, replace=False))
        started = time.process_time()
        dataset[rows]
        cpu += time.process_time() - started
    group_bytes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
    per_10k = 10_000 / table.num_rows
    return {
        "ms_per_image": cpu / (batches * batch_size) * 1e3,
        "mb_per_image": float(np.mean(group_bytes)) / 2**20,  # one row group read per image
        "footer_kb_per_10k": meta.serialized_size / 1024 * per_10k,
        "rows_per_group": meta.row_group(0).num_rows,
        "index_ms_per_10k": index_s * 1e3 * per_10k,
        "open_ms_per_10k": open_s * 1e3 * per_10k,
        "file_mb": path.stat().st_size / 2**20,
    }


def decode_only_ms(images: list[bytes]) -> float:
    started = time.process_time()
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            decode_image(data, img.height, img.width, "bench")
    return (time.process_time() - started) / len(images) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rows", type=int, default=768, help="images per shard")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    for resolution in args.resolutions:
        images, shapes = photo_pngs(args.rows, resolution)
        table = canonical_rows(images, shapes)
        mean = float(np.mean([len(b) for b in images]))
        decode = decode_only_ms(images[:64])
        print(f"\n{resolution} px: {args.rows} photo-like PNGs, mean {mean / 1024:.0f} KiB; "
              f"decoding one alone costs {decode:.2f} ms")
        print("| layout | rows a group | ms per image (read + decode) | MiB read per image | footer KiB per 10k rows "
              "| shard open ms per 10k rows | index build ms per 10k rows | file MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        baseline = None
        for name, write in layouts().items():
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(table, resolution, Path(tmp), write, args.batches, args.batch_size,
                              np.random.default_rng(1))
            baseline = baseline or row
            print(f"| {name} | {row['rows_per_group']} | {row['ms_per_image']:.2f} "
                  f"({baseline['ms_per_image'] / row['ms_per_image']:.1f}x) | {row['mb_per_image']:.1f} "
                  f"| {row['footer_kb_per_10k']:.0f} | {row['open_ms_per_10k']:.1f} | {row['index_ms_per_10k']:.0f} "
                  f"| {row['file_mb']:.1f} |")


if __name__ == "__main__":
    main()
