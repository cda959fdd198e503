"""Bucket index build: the seed repo's method vs etl.index.build_index, cold, on the same shards.

Reference (the seed's create_indices): HF ``datasets.load_dataset("parquet")`` of the folder, then row
indices grouped by (height, width) per 10k-row chunk in a multiprocessing pool. Ours reads three columns.
Shards carry realistic payloads (random bytes, --payload-kb per row); ours is also timed on the same
rows with tiny payloads, and on a larger tiny-payload set (--scale-rows-per-shard) to extrapolate to 25M rows.

    .venv/bin/python benchmarks/index_build.py                      # ~1 GB of shards, a few minutes
    .venv/bin/python benchmarks/index_build.py --shards 100 --rows-per-shard 400
    .venv/bin/python benchmarks/index_build.py --layouts            # the bucketed layouts, before vs now
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl.buckets import bucket_order, write_bucketed
from etl.index import bucket_histogram, build_index, duplicate_keys
from etl.schema import CANONICAL, conform
from etl.storage import write_parquet_atomic

TARGET_ROWS = 25_000_000
CHUNK = 10_000
BUCKETS = [(256, 256), (256, 192), (192, 256), (256, 128), (128, 256), (256, 176), (176, 256)]
# Rows a row group that write_bucketed picks for the photo-like PNGs of each resolution (docs/benchmarks.md,
# "Bucket shard reads"): the layouts whose many small groups the index build pays for.
LAYOUT_ROWS_PER_GROUP = {256: 66, 512: 17, 1024: 5}


def shard_table(shard: int, rows: int, payload_bytes: int, rng: np.random.Generator) -> pa.Table:
    choice = rng.integers(0, len(BUCKETS), rows)
    table = pa.table(
        {
            "key": [f"src-{shard * rows + i:09d}" for i in range(rows)],
            "caption": ["a photo of something"] * rows,
            "image": [os.urandom(payload_bytes) for _ in range(rows)],
            "height": [BUCKETS[c][0] for c in choice],
            "width": [BUCKETS[c][1] for c in choice],
        }
    )
    return conform(table, CANONICAL)


def write_shards(folder: Path, shards: int, rows_per_shard: int, payload_bytes: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [write_parquet_atomic(shard_table(s, rows_per_shard, payload_bytes, rng), folder / f"{s:05d}.parquet")
            for s in range(shards)]


def write_layouts(folder: Path, shards: int, rows_per_shard: int, rows_per_group: int) -> dict[str, list[Path]]:
    """The same tiny-payload shards in the bucketed layout with ``rows_per_group`` rows a group, written
    by ``write_bucketed`` (ours) and by its codec before (key/height/width in zstd like the other columns)."""
    rng = np.random.default_rng(0)
    paths: dict[str, list[Path]] = {"zstd (before)": [], "uncompressed (write_bucketed)": []}
    for s in range(shards):
        table = shard_table(s, rows_per_shard, 16, rng)
        name = f"{s:05d}.parquet"
        ordered = table.take(pa.array(bucket_order(table), pa.int64()))
        paths["zstd (before)"].append(write_parquet_atomic(
            ordered, folder / "before" / name, row_group_size=rows_per_group, uncompressed=("image",),
            statistics=("height", "width")))
        group_bytes = rows_per_group * (table["image"].nbytes // table.num_rows)
        paths["uncompressed (write_bucketed)"].append(write_bucketed(table, folder / "ours" / name, group_bytes))
    return paths


def layout_builds(work: Path, shards: int, rows_per_shard: int, repeats: int) -> None:
    """Index build over shards in the pipeline's bucketed layouts (LAYOUT_ROWS_PER_GROUP), before and after
    the index columns skipped zstd; both layouts timed alternately, cold, median of ``repeats``."""
    print(f"{'layout':>8} {'rows a group':>13} {'codec of key/height/width':>32} {'build s':>9} {'ns/row':>8} "
          f"{'25M rows s':>11} {'ratio':>7}")
    for resolution, rows_per_group in LAYOUT_ROWS_PER_GROUP.items():
        layouts = write_layouts(work / f"layout_{resolution}", shards, rows_per_shard, rows_per_group)
        os.sync()
        seconds: dict[str, list[float]] = {name: [] for name in layouts}
        indexes = {}
        for _ in range(repeats):
            for name, paths in layouts.items():
                evict_from_page_cache(paths)
                indexes[name], elapsed = timed(build_index, paths)
                seconds[name].append(elapsed)
        before, ours = (indexes[name] for name in layouts)
        assert before.equals(ours)
        medians = {name: float(np.median(s)) for name, s in seconds.items()}
        baseline = medians["zstd (before)"]
        for name, median in medians.items():
            per_row = median / ours.num_rows
            print(f"{resolution:>8} {rows_per_group:>13} {name:>32} {median:>9.3f} {per_row * 1e9:>8.0f} "
                  f"{per_row * TARGET_ROWS:>11.1f} {baseline / median:>6.2f}x")


def evict_from_page_cache(paths: list[Path]) -> None:
    """Cold start without touching other processes' cache: drop only these files' pages."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_DATASET = None  # the reference's workers inherit the memory-mapped dataset through fork


def _reference_chunk(bounds: tuple[int, int]) -> dict[tuple[int, int], list[int]]:
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in range(*bounds):
        row = _DATASET[i]
        buckets.setdefault((row["height"], row["width"]), []).append(i)
    return buckets


def reference_index(folder: Path, cache_dir: Path, processes: int) -> dict[tuple[int, int], list[int]]:
    global _DATASET
    from datasets import load_dataset  # benchmark-only dependency

    _DATASET = load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(cache_dir))
    chunks = [(start, min(start + CHUNK, len(_DATASET))) for start in range(0, len(_DATASET), CHUNK)]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.map(_reference_chunk, chunks)
    merged: dict[tuple[int, int], list[int]] = {}
    for part in parts:
        for bucket, rows in part.items():
            merged.setdefault(bucket, []).extend(rows)
    return merged


def disk_read_bytes() -> int:
    """Bytes this process fetched from storage (not the page cache), from Linux's /proc/self/io."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def cold_build(paths: list[Path], repeats: int) -> tuple[pa.Table, float, int]:
    """Median seconds over cold runs, and the bytes read from disk by one cold run."""
    seconds = []
    for _ in range(repeats):
        evict_from_page_cache(paths)
        before = disk_read_bytes()
        index, elapsed = timed(build_index, paths)
        read = disk_read_bytes() - before
        seconds.append(elapsed)
    return index, float(np.median(seconds)), read


def duplicate_check(rows: int) -> tuple[float, float]:
    """Seconds of the bucket_index asset's key-uniqueness check over ``rows`` keys shaped like the pipeline's
    (``<source>-<9 digits>``): a set of Python strings (what it did before) vs ``duplicate_keys``. Measured at
    full size: the set's cost per key grows with its size."""
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(rows)), pa.string()), 9, "0")
    keys = pc.binary_join_element_wise("cc12m-", digits, "")
    index = pa.table({"key": keys})
    as_set, set_s = timed(lambda: len(set(index["key"].to_pylist())))
    (repeated, _), ours_s = timed(duplicate_keys, index)
    assert index.num_rows - as_set == repeated == 0
    return set_s, ours_s


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=50)
    parser.add_argument("--rows-per-shard", type=int, default=200)
    parser.add_argument("--payload-kb", type=int, default=100)
    parser.add_argument("--scale-rows-per-shard", type=int, default=10_000, help="tiny-payload run for extrapolation")
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="cold runs of ours; the median is reported")
    parser.add_argument("--key-check-rows", type=int, default=5_000_000,
                        help="keys for the uniqueness check (25000000: the reference scale, ~3 GiB for the set); 0 skips")
    parser.add_argument("--layouts", action="store_true",
                        help="only the index build over the bucketed layouts at 256/512/1024, codec before vs now")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="index_bench_", dir=args.workdir))
    try:
        if args.layouts:
            layout_builds(work, args.shards, args.scale_rows_per_shard, args.repeats)
            return
        rows = args.shards * args.rows_per_shard
        heavy = write_shards(work / "heavy", args.shards, args.rows_per_shard, args.payload_kb * 1024)
        light = write_shards(work / "light", args.shards, args.rows_per_shard, 16)
        scale = write_shards(work / "scale", args.shards, args.scale_rows_per_shard, 16)
        print(f"{args.shards} shards x {args.rows_per_shard} rows = {rows} rows; "
              f"{folder_bytes(heavy) / 1e9:.2f} GB with {args.payload_kb} KB payloads, "
              f"{folder_bytes(light) / 1e6:.2f} MB with 16-byte payloads")

        os.sync()  # no write-back of the fresh shards competing with the timed reads
        ours, ours_s, ours_read = cold_build(heavy, args.repeats)
        _, light_s, light_read = cold_build(light, args.repeats)
        scaled, scale_s, _ = cold_build(scale, args.repeats)
        evict_from_page_cache(heavy)
        reference, ref_s = timed(reference_index, work / "heavy", work / "hf_cache", args.processes)

        # Same content: the reference's global row ids are our (shard, row) in file order.
        assert {f"{h}x{w}": len(r) for (h, w), r in sorted(reference.items())} == bucket_histogram(ours)
        per_row_ref, per_row_ours, per_row_scale = ref_s / rows, ours_s / rows, scale_s / scaled.num_rows
        print(f"{'':34}{'reference':>14}{'ours':>14}{'ratio':>10}")
        print(f"{'index, payload rows (s)':34}{ref_s:>14.3f}{ours_s:>14.3f}{ref_s / ours_s:>9.0f}x")
        print(f"{'per row (us)':34}{per_row_ref * 1e6:>14.2f}{per_row_ours * 1e6:>14.3f}")
        print(f"{'extrapolated to 25M rows':34}{per_row_ref * TARGET_ROWS / 3600:>12.1f} h{per_row_ours * TARGET_ROWS:>12.1f} s")
        print(f"ours, same rows with 16-byte payloads: {light_s:.3f} s (payload-heavy / tiny = {ours_s / light_s:.2f}x); "
              f"read from disk: {ours_read / 1e6:.1f} MB of {folder_bytes(heavy) / 1e9:.2f} GB with payloads, "
              f"{light_read / 1e6:.1f} MB with tiny payloads")
        print(f"ours at scale (median of {args.repeats} cold runs): {scaled.num_rows} rows ({args.scale_rows_per_shard} per shard) in {scale_s:.3f} s = "
              f"{per_row_scale * 1e9:.0f} ns/row -> {per_row_scale * TARGET_ROWS:.1f} s for 25M rows")
        if args.key_check_rows:
            set_s, check_s = duplicate_check(args.key_check_rows)
            print(f"key-uniqueness check of {args.key_check_rows} keys: set of str {set_s:.2f} s, duplicate_keys "
                  f"{check_s:.2f} s ({set_s / check_s:.1f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
