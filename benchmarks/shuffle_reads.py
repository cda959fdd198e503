"""What a loader's batch costs to read under each ``data.shuffle``: rows vs row_groups.

Bucket shards are parquet, and parquet hands out a row only by decoding its whole row group. With
``shuffle: rows`` every image of a batch comes from a different row group once a bucket holds many more
groups than a batch has images (any real dataset), so a batch of B images reads about B groups (~8 MiB
each); with ``shuffle: row_groups`` a batch is a few whole groups. One bucket of photo-like PNGs (the
pipeline's default bucket format) is written by ``etl.buckets.write_bucketed`` over several shards and
indexed by ``etl.index.build_index``, with GROUPS_PER_BATCH x the batch size in row groups; the real
``BucketSampler`` draws batches and ``BucketBatches`` reads and decodes them in this process, both modes
over the same files, alternating batch by batch so that machine load falls on both.

"MiB read per image" counts the compressed bytes of every row group a batch reads (the columns the
loader asks for): what a cold read pulls from disk. "ms per image" is process CPU time (read + decode)
with the files in the page cache. The images repeat under new keys (generating photo-like PNGs is slow),
each copy made unique by a PNG text chunk naming its key: parquet would otherwise store repeated
images once, in a dictionary.

    .venv/bin/python benchmarks/shuffle_reads.py                     # 256, 512, 1024 px; ~7 GB of temp files
    .venv/bin/python benchmarks/shuffle_reads.py --resolutions 512 --batch-size 120
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.bucket_reads import canonical_rows
from benchmarks.bucket_resize import photo_like
from etl.buckets import encode_image, row_group_rows, write_bucketed
from etl.index import build_index
from etl.layout import DataLayout
from trainer.data import SHARD_COLUMNS, SHUFFLES, BucketBatches, BucketSampler

DISTINCT_IMAGES = 32  # generated once per resolution, repeated under new keys
# Row groups in the bucket per image of a batch: with rows, a batch then reads ~0.92 groups an image
# (1 - e^(-1/6) of 6), close to the 1 of a real dataset, in a few GB of temporary files.
GROUPS_PER_BATCH = 6
SHARDS = 4


def unique_copy(png: bytes, key: str) -> bytes:
    """``png`` with a tEXt chunk naming ``key`` after its header: the same pixels, different bytes."""
    data = b"key\x00" + key.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    header_end = 8 + 25  # signature, then the IHDR chunk (length, type, 13 bytes, crc)
    return png[:header_end] + chunk + png[header_end:]


def write_bucket(folder: Path, resolution: int, rows: int) -> tuple[list[Path], float]:
    """One square bucket of ``rows`` PNGs over SHARDS shards; the shard paths and the mean PNG KiB."""
    rng = np.random.default_rng(0)
    images = [encode_image(photo_like(resolution, resolution, rng), "png", 95) for _ in range(DISTINCT_IMAGES)]
    per_shard = -(-rows // SHARDS)
    paths = []
    for shard in range(SHARDS):
        keys = [f"s{shard:03d}-{i:06d}" for i in range(per_shard)]
        copies = [unique_copy(images[(shard * per_shard + i) % DISTINCT_IMAGES], key) for i, key in enumerate(keys)]
        table = canonical_rows(copies, [(resolution, resolution)] * per_shard)
        table = table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys))
        paths.append(write_bucketed(table, DataLayout(folder).bucketed(resolution, f"{shard:05d}")))
    return paths, float(np.mean([len(b) for b in images])) / 1024


def group_bytes(paths: list[Path]) -> dict[tuple[str, int], int]:
    """(shard name, row group) -> compressed bytes of the columns the loader reads."""
    sizes = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            sizes[(path.name, g)] = sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                                        if group.column(c).path_in_schema in SHARD_COLUMNS)
    return sizes


def measure(folder: Path, resolution: int, batch: int, batches: int) -> tuple[int, float, dict]:
    rng = np.random.default_rng(0)
    probe = canonical_rows([encode_image(photo_like(resolution, resolution, rng), "png", 95)] * 4,
                           [(resolution, resolution)] * 4)
    rows_a_group = row_group_rows(probe)
    paths, png_kib = write_bucket(folder, resolution, GROUPS_PER_BATCH * batch * rows_a_group)
    index = build_index(paths)
    sizes = group_bytes(paths)
    shards, groups = index["shard"].to_pylist(), index["row_group"].to_numpy()
    dataset = BucketBatches(folder, resolution, index, detailed_caption_prob=0.5, seed=0)
    for path in paths:  # every shard's footer parsed and its pages in the page cache before timing
        dataset[[shards.index(path.name)]]
        path.read_bytes()
    draws = {mode: iter(BucketSampler(index, batch, seed=1, shuffle=mode)) for mode in SHUFFLES}
    totals = {mode: {"cpu": 0.0, "bytes": 0, "groups": 0} for mode in SHUFFLES}
    for _ in range(batches):
        for mode in SHUFFLES:
            rows = next(draws[mode])
            read = {(shards[r], int(groups[r])) for r in rows}
            started = time.process_time()
            dataset[rows]
            totals[mode]["cpu"] += time.process_time() - started
            totals[mode]["bytes"] += sum(sizes[g] for g in read)
            totals[mode]["groups"] += len(read)
    return rows_a_group, png_kib, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=48, help="images a loader reads per batch")
    parser.add_argument("--batches", type=int, default=6, help="batches timed per mode")
    args = parser.parse_args()
    print("| R | batch | rows a group | shuffle | row groups read per batch | MiB read per image "
          "| ms per image (read + decode) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for resolution in args.resolutions:
        with tempfile.TemporaryDirectory() as tmp:
            rows_a_group, png_kib, totals = measure(Path(tmp), resolution, args.batch_size, args.batches)
        images = args.batches * args.batch_size
        base = totals["rows"]
        for mode in SHUFFLES:
            t = totals[mode]
            print(f"| {resolution} (PNG {png_kib:.0f} KiB) | {args.batch_size} | {rows_a_group} | {mode} "
                  f"| {t['groups'] / args.batches:.1f} | {t['bytes'] / images / 2**20:.2f} "
                  f"({base['bytes'] / t['bytes']:.1f}x fewer) | {t['cpu'] / images * 1e3:.2f} "
                  f"({base['cpu'] / t['cpu']:.2f}x lower) |", flush=True)


if __name__ == "__main__":
    main()
