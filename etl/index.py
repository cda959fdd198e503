"""The bucket index: every row of a resolution's shards, sorted by bucket, built from three columns and
the footers (the row group of each row).

Only key/height/width are read (parquet is columnar, so the image payload is never touched), shards are
read concurrently (Arrow releases the GIL), and the sort is a stable sort on two integer columns: reading
the shards in file-name order already puts (shard, row) in order within each bucket.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from etl.storage import CorruptShardError

INDEX_COLUMNS = ["key", "height", "width"]
# One file name per row would cost ~20 bytes a row at 25M rows; dictionary-encoded it costs 4.
INDEX = pa.schema(
    [
        ("shard", pa.dictionary(pa.int32(), pa.string())),
        ("row", pa.int32()),
        ("row_group", pa.int32()),  # the shard's parquet row group holding the row (the sampler's unit of reading)
        ("key", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)
_READ_THREADS = 8  # parquet reads wait on the disk as much as on the CPU


def _read_shard(path: Path) -> tuple[pa.Table, np.ndarray]:
    """key/height/width of every row, and the number of rows of each row group."""
    # pq.ParquetFile.read costs ~0.3 ms a file against ~0.8 ms for pq.read_table (etl.storage.read_parquet),
    # which sets up a whole dataset scan per file: at 2,500 shards that fixed cost would dominate.
    if not path.exists():
        raise FileNotFoundError(f"shard not found: {path}")
    try:
        file = pq.ParquetFile(path)
        table = file.read(columns=INDEX_COLUMNS)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read parquet file {path}: {err}") from err
    if table.column_names != INDEX_COLUMNS:
        raise CorruptShardError(f"shard {path} lacks columns {sorted(set(INDEX_COLUMNS) - set(table.column_names))}")
    for name in INDEX_COLUMNS:
        if table[name].null_count:
            raise CorruptShardError(f"shard {path} has {table[name].null_count} rows with no {name}")
    try:
        table = table.cast(pa.schema([("key", pa.string()), ("height", pa.int32()), ("width", pa.int32())]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CorruptShardError(f"shard {path}: key/height/width have the wrong types: {err}") from err
    meta = file.metadata
    return table, np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)


def build_index(shard_paths: list[Path]) -> pa.Table:
    """(shard, row, row_group, key, height, width) for every row of every shard, sorted by (height, width,
    shard, row)."""
    paths = sorted((Path(p) for p in shard_paths), key=lambda p: p.name)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"shard file names must be unique within one index: {names}")
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        shards = list(pool.map(_read_shard, paths))
    if not shards:
        return INDEX.empty_table()
    tables = [table for table, _ in shards]
    rows = pa.concat_tables(tables)
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    shard_ids = np.repeat(np.arange(len(tables), dtype=np.int32), counts)
    row_ids = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
    group_ids = np.concatenate([np.repeat(np.arange(len(groups), dtype=np.int32), groups) for _, groups in shards])
    # One int64 sort key per row: sorting it once is ~2x faster than a two-column sort, and a stable
    # sort keeps the (shard, row) order the shards were concatenated in.
    bucket = (rows["height"].to_numpy().astype(np.int64) << 32) | rows["width"].to_numpy().astype(np.int64)
    order = (
        pl.DataFrame({"bucket": bucket}).with_row_index("position").sort("bucket", maintain_order=True)["position"]
    ).to_numpy()
    ordered = rows.take(order)
    shard = pa.DictionaryArray.from_arrays(pa.array(shard_ids[order]), pa.array(names, pa.string()))
    columns = [shard, pa.array(row_ids[order]), pa.array(group_ids[order]), ordered["key"], ordered["height"],
               ordered["width"]]
    return pa.Table.from_arrays(columns, schema=INDEX)


def bucket_histogram(index: pa.Table) -> dict[str, int]:
    """Rows per bucket as {"HxW": count}, in (height, width) order."""
    counts = pl.from_arrow(index.select(["height", "width"])).group_by(["height", "width"]).len().sort(["height", "width"])
    return {f"{h}x{w}": n for h, w, n in counts.iter_rows()}


def duplicate_keys(index: pa.Table, examples: int = 20) -> tuple[int, list[str]]:
    """How many rows repeat an earlier row's key, and up to ``examples`` of the repeated keys.

    In polars: a set of Python strings would cost ~100 bytes and ~1 us a row (seconds and gigabytes at
    25M rows)."""
    keys = pl.from_arrow(index.select(["key"]))["key"]
    repeated = keys.len() - keys.n_unique()
    if not repeated:
        return 0, []
    return repeated, keys.filter(keys.is_duplicated()).unique(maintain_order=True).head(examples).to_list()


DATASET_VERSION_KEY = b"sd3.dataset_version"


def with_dataset_version(index: pa.Table, shard_versions: dict[str, str]) -> pa.Table:
    """The index carrying its dataset version in its parquet metadata: its keys and buckets
    (``bucket_order_version``) and the content versions of the bucketed shards it indexes, so new captions
    or re-encoded images give a new id though every key stays in its bucket."""
    digest = hashlib.sha256(bucket_order_version(index).encode())
    for shard, version in sorted(shard_versions.items()):
        digest.update(f"\n{shard}={version}".encode())
    return index.replace_schema_metadata({**(index.schema.metadata or {}), DATASET_VERSION_KEY: digest.hexdigest()[:16]})


def dataset_version(index: pa.Table) -> str:
    """What the trainer records and lineage shows: the version ``with_dataset_version`` stored, or, for an
    index written without one, its ``bucket_order_version``."""
    recorded = (index.schema.metadata or {}).get(DATASET_VERSION_KEY)
    return recorded.decode() if recorded else bucket_order_version(index)


def bucket_order_version(index: pa.Table) -> str:
    """16 hex digits from the keys and buckets in index order: what fixes the sampler's order of batches
    (same rows in the same buckets, same id, on any machine)."""
    digest = hashlib.sha256()
    _hash_strings(digest, index["key"])
    for name in ("height", "width"):
        digest.update(index[name].to_numpy().astype("<i4").tobytes())
    return digest.hexdigest()[:16]


def row_group_version(index: pa.Table) -> str:
    """16 hex digits from each row's shard and row group: with ``data.shuffle: row_groups`` these fix the
    order of batches too, and shards rewritten with other row groups keep every key in its bucket."""
    digest = hashlib.sha256()
    _hash_strings(digest, index["shard"])
    digest.update(index["row_group"].to_numpy().astype("<i8").tobytes())
    return digest.hexdigest()[:16]


def _hash_strings(digest, column: pa.ChunkedArray) -> None:
    # Lengths and bytes, not Arrow's offsets, which depend on how the table was sliced.
    values = column.combine_chunks().cast(pa.large_string())
    digest.update(pc.binary_length(values).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + len(values) + 1]
    if len(values):
        digest.update(memoryview(values.buffers()[2])[offsets[0] : offsets[-1]])
