"""The `content_hashes` asset's reads: whole downloaded shards (before) vs the four columns dedup needs (now);
and what a stage pays to record the content version of the shard it reads (read_parquet_versioned).

Shards carry realistic payloads (random bytes, --payload-kb per row, stored as the downloaded stage stores
them); every read is cold (the shards' pages dropped from the cache first), and the winners are asserted
equal.

    .venv/bin/python benchmarks/content_hashes.py                    # 8 shards x 1000 rows x 100 KB
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.index_build import evict_from_page_cache  # noqa: E402
from etl.config import FilterConfig  # noqa: E402
from etl.filter import HASH_CANDIDATE_COLUMNS, duplicate_winners, hash_candidates  # noqa: E402
from etl.schema import CANONICAL, conform  # noqa: E402
from etl.storage import read_parquet, read_parquet_versioned, write_parquet_atomic  # noqa: E402

TARGET_ROWS = 12_000_000  # CC12M


def downloaded_shard(shard: int, rows: int, payload_bytes: int, rng: np.random.Generator) -> pa.Table:
    """Rows as the download stage writes them (canonical schema, zstd), each image with its content hash."""
    images = [rng.bytes(payload_bytes) for _ in range(rows)]
    return conform(pa.table({
        "key": [f"src-{shard * rows + i:09d}" for i in range(rows)],
        "image": images,
        "sha256": [hashlib.sha256(image).hexdigest() for image in images],
        "punsafe": rng.random(rows),
        "pwatermark": rng.random(rows),
    }), CANONICAL)


def winners(paths: list[Path], columns: list[str] | None, cfg: FilterConfig):
    evict_from_page_cache(paths)
    start = time.perf_counter()
    table = duplicate_winners(hash_candidates(read_parquet(p, columns=columns), cfg) for p in paths)
    return table, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--rows-per-shard", type=int, default=1000)
    parser.add_argument("--payload-kb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = FilterConfig()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = [write_parquet_atomic(downloaded_shard(s, args.rows_per_shard, args.payload_kb * 1024, rng),
                                      Path(tmp) / f"{s:05d}.parquet")
                 for s in range(args.shards)]
        rows = args.shards * args.rows_per_shard
        size = sum(p.stat().st_size for p in paths)
        times: dict[str, list[float]] = {"every column (before)": [], "the hash columns (now)": []}
        results = {}
        for _ in range(args.repeats):
            for name, columns in (("every column (before)", None), ("the hash columns (now)", HASH_CANDIDATE_COLUMNS)):
                results[name], seconds = winners(paths, columns, cfg)
                times[name].append(seconds)
        assert results["every column (before)"].equals(results["the hash columns (now)"])
        reads: dict[str, list[float]] = {"read_parquet": [], "read_parquet_versioned": []}
        for _ in range(args.repeats):
            for name, read in (("read_parquet", read_parquet), ("read_parquet_versioned", read_parquet_versioned)):
                evict_from_page_cache(paths)
                start = time.perf_counter()
                for path in paths:
                    read(path)
                reads[name].append(time.perf_counter() - start)

    print(f"{args.shards} shards x {args.rows_per_shard} rows, {size / 2**20:.0f} MiB, cold, "
          f"median of {args.repeats}")
    print(f"{'read':>24} {'seconds':>9} {'us/row':>8} {f'{TARGET_ROWS // 10**6}M rows, min':>14} {'ratio':>7}")
    baseline = statistics.median(times["every column (before)"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>24} {median:>9.3f} {median / rows * 1e6:>8.1f} {median / rows * TARGET_ROWS / 60:>14.1f} "
              f"{baseline / median:>6.1f}x")
    # What a stage pays to record the content version of the shard it reads (orchestration/freshness.py).
    plain, versioned = (statistics.median(reads[name]) for name in ("read_parquet", "read_parquet_versioned"))
    print(f"whole shards read, cold: read_parquet {plain:.3f} s, read_parquet_versioned {versioned:.3f} s "
          f"({versioned / plain:.2f}x, {(versioned - plain) / (size / 2**30):.2f} s more per GiB)")


if __name__ == "__main__":
    main()
