import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.index import (bucket_histogram, bucket_order_version, build_index, dataset_version, duplicate_keys,
                       row_group_version, with_dataset_version)
from etl.storage import CorruptShardError, read_parquet, write_parquet_atomic
from etl.schema import CANONICAL, conform

BUCKETS = [(256, 256), (256, 128), (128, 256), (192, 256)]


def _shard(path, name: str, rows: int, seed: int):
    rng = np.random.default_rng(seed)
    buckets = [BUCKETS[i] for i in rng.integers(0, len(BUCKETS), rows)]
    table = pa.table(
        {
            "key": [f"{name}-{i:09d}" for i in range(rows)],
            "image": [rng.bytes(2000) for _ in range(rows)],
            "height": [h for h, _ in buckets],
            "width": [w for _, w in buckets],
        }
    )
    return write_parquet_atomic(conform(table, CANONICAL), path / f"{name}.parquet")


@pytest.fixture
def shards(tmp_path):
    # written out of name order, with different sizes, one of them empty
    return [_shard(tmp_path, name, rows, seed) for seed, (name, rows) in enumerate([("c", 40), ("a", 25), ("b", 0), ("d", 60)])]


def test_index_is_complete_sorted_and_points_at_the_right_rows(shards):
    index = build_index(shards)
    assert index.column_names == ["shard", "row", "row_group", "key", "height", "width"]
    assert index.num_rows == 125
    rows = index.to_pylist()
    assert rows == sorted(rows, key=lambda r: (r["height"], r["width"], r["shard"], r["row"]))
    by_name = {p.name: read_parquet(p).to_pylist() for p in shards}
    assert {(r["shard"], r["row"]) for r in rows} == {(n, i) for n, t in by_name.items() for i in range(len(t))}
    for r in rows:
        source = by_name[r["shard"]][r["row"]]
        assert (r["key"], r["height"], r["width"]) == (source["key"], source["height"], source["width"])


def test_index_names_the_row_group_of_every_row(tmp_path):
    source = read_parquet(_shard(tmp_path, "source", 70, 5))
    path = write_parquet_atomic(source, tmp_path / "grouped.parquet", row_group_size=16)
    file = pq.ParquetFile(path)
    assert file.num_row_groups == 5
    index = build_index([path])
    assert sorted(set(index["row_group"].to_pylist())) == [0, 1, 2, 3, 4]
    for r in index.to_pylist():
        assert file.read_row_group(r["row_group"], columns=["key"])["key"][r["row"] % 16].as_py() == r["key"]


def test_index_reads_only_key_height_width(shards):
    path = shards[0]
    meta = pq.ParquetFile(path).metadata
    image = meta.schema.names.index("image")
    chunk = meta.row_group(0).column(image)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    with open(path, "r+b") as f:  # wreck the image column's pages, leave the rest and the footer intact
        f.seek(start)
        f.write(b"\xff" * chunk.total_compressed_size)
    with pytest.raises(CorruptShardError):
        read_parquet(path)
    assert build_index(shards).num_rows == 125


def test_corrupt_or_incomplete_shard_is_named(shards, tmp_path):
    garbage = tmp_path / "e.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CorruptShardError, match="e.parquet"):
        build_index(shards + [garbage])
    no_height = tmp_path / "f.parquet"
    write_parquet_atomic(pa.table({"key": ["x"], "width": [16]}), no_height)
    with pytest.raises(CorruptShardError, match="f.parquet"):
        build_index(shards + [no_height])
    text_sizes = tmp_path / "h.parquet"
    write_parquet_atomic(pa.table({"key": ["x"], "height": ["tall"], "width": [16]}), text_sizes)
    with pytest.raises(CorruptShardError, match="h.parquet"):
        build_index(shards + [text_sizes])
    with pytest.raises(FileNotFoundError, match="g.parquet"):
        build_index(shards + [tmp_path / "g.parquet"])


def test_histogram_counts_every_row_by_height_then_width(shards):
    index = build_index(shards)
    histogram = bucket_histogram(index)
    assert list(histogram) == ["128x256", "192x256", "256x128", "256x256"]
    assert sum(histogram.values()) == index.num_rows
    portrait = sum(1 for r in index.to_pylist() if (r["height"], r["width"]) == (256, 128))
    assert histogram["256x128"] == portrait
    assert bucket_histogram(build_index([])) == {}


def test_duplicate_keys_counts_every_repeat_and_names_the_keys(shards, tmp_path):
    assert duplicate_keys(build_index(shards)) == (0, [])
    copy = tmp_path / "copy"
    copy.mkdir()
    # "e" repeats rows 0-9 of shard "a", and row 3 of "a" twice more
    a = read_parquet(shards[1])
    repeats = a.take(list(range(10)) + [3, 3])
    e = write_parquet_atomic(repeats, copy / "e.parquet")
    repeated, keys = duplicate_keys(build_index([*shards, e]))
    assert repeated == 12
    assert sorted(keys) == sorted(a["key"].to_pylist()[:10])
    assert len(duplicate_keys(build_index([*shards, e]), examples=4)[1]) == 4


def test_bucket_order_version_follows_keys_and_buckets_only(shards, tmp_path):
    index = build_index(shards)
    version = bucket_order_version(index)
    assert len(version) == 16 and int(version, 16) >= 0
    assert bucket_order_version(build_index(list(reversed(shards)))) == version
    rechunked = pa.concat_tables([index.slice(0, 7), index.slice(7)])
    assert bucket_order_version(rechunked) == version
    resized = index.set_column(index.schema.get_field_index("height"), "height", pa.array([h + 16 if i == 0 else h for i, h in enumerate(index["height"].to_pylist())], pa.int32()))
    assert bucket_order_version(resized) != version
    renamed = index.set_column(index.schema.get_field_index("key"), "key", pa.array(["z" + k for k in index["key"].to_pylist()]))
    assert bucket_order_version(renamed) != version
    assert bucket_order_version(index.slice(1)) != version


def test_row_group_version_follows_how_rows_are_grouped_and_nothing_else(shards):
    index = build_index(shards)
    version = row_group_version(index)
    assert row_group_version(pa.concat_tables([index.slice(0, 7), index.slice(7)])) == version
    regrouped = index.set_column(index.schema.get_field_index("row_group"), "row_group",
                                 pa.array([g + (i % 2) for i, g in enumerate(index["row_group"].to_pylist())], index["row_group"].type))
    assert bucket_order_version(regrouped) == bucket_order_version(index)  # same keys, same buckets
    assert row_group_version(regrouped) != version


def test_dataset_version_also_follows_the_shards_contents_and_survives_the_file(shards, tmp_path):
    index = build_index(shards)
    assert dataset_version(index) == bucket_order_version(index)  # an index written without one
    versions = {"a": "1111", "b": "2222"}
    versioned = with_dataset_version(index, versions)
    assert dataset_version(versioned) != bucket_order_version(index)
    assert dataset_version(with_dataset_version(index, {**versions, "b": "3333"})) != dataset_version(versioned)
    assert dataset_version(with_dataset_version(index.slice(1), versions)) != dataset_version(versioned)
    write_parquet_atomic(versioned, tmp_path / "index.parquet")
    assert dataset_version(read_parquet(tmp_path / "index.parquet")) == dataset_version(versioned)
