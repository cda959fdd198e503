"""URL lists (LAION parquet, CC12M TSV) -> keyed URL shards."""

from __future__ import annotations

import bz2
import gzip
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.config import ConfigError, PipelineConfig, SourceConfig
from etl.layout import DataLayout
from etl.schema import URLS
from etl.sources import read_url_list, shard_url_list, write_url_shards
from etl.storage import read_parquet


def laion_parquet(path: Path, n: int) -> Path:
    pq.write_table(
        pa.table(
            {
                "URL": [f"http://example.com/{i}.jpg" for i in range(n)],
                "TEXT": [f"photo {i}" for i in range(n)],
                "punsafe": pa.array([0.1 * i for i in range(n)], pa.float32()),
                "similarity": [0.3] * n,
                "WIDTH": list(range(n)),
                "unused": ["x"] * n,
            }
        ),
        path,
    )
    return path


def test_laion_parquet_with_configured_columns(tmp_path):
    source = SourceConfig(
        name="laion",
        path=laion_parquet(tmp_path / "laion.parquet", 5),
        url_col="URL",
        caption_col="TEXT",
        extra_cols=["punsafe", "similarity", "WIDTH"],
    )
    table = read_url_list(source)
    assert table.column_names == ["url", "caption", "source", "punsafe", "pwatermark", "similarity", "WIDTH"]
    assert table["url"].to_pylist() == [f"http://example.com/{i}.jpg" for i in range(5)]
    assert table["source"].to_pylist() == ["laion"] * 5
    assert table.schema.field("punsafe").type == pa.float64()
    assert table["punsafe"].to_pylist() == pytest.approx([0.1 * i for i in range(5)])
    assert table["pwatermark"].null_count == 5
    assert table["WIDTH"].to_pylist() == list(range(5))


def test_cc12m_tsv_keeps_quotes_in_captions(tmp_path):
    path = tmp_path / "cc12m.tsv"
    path.write_text(
        "image_url\tcaption\tpwatermark\n"
        'http://a.com/1.jpg\tthe "best" dog\'s toy\t0.25\n'
        'http://a.com/2.jpg\t"quoted start\t0.5\n'
    )
    source = SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", url_col="image_url", extra_cols=["pwatermark"])
    table = read_url_list(source)
    assert table["caption"].to_pylist() == ['the "best" dog\'s toy', '"quoted start']
    assert table["pwatermark"].to_pylist() == [0.25, 0.5]
    assert table["punsafe"].null_count == 2


def test_cc12m_tsv_without_a_header_row_as_cc12m_ships(tmp_path):
    path = tmp_path / "cc12m.tsv"
    path.write_text('http://a.com/1.jpg\ta "dog"\nhttp://a.com/2.jpg\ta cat <PERSON>\n')
    table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
    assert table["url"].to_pylist() == ["http://a.com/1.jpg", "http://a.com/2.jpg"]
    assert table["caption"].to_pylist() == ['a "dog"', "a cat <PERSON>"]


def test_cc12m_lines_with_a_tab_too_many_or_too_few_are_repaired_in_place(tmp_path, caplog):
    path = tmp_path / "cc12m.tsv"
    path.write_bytes("http://a.com/1.jpg\ta dog\r\n"
                     "http://a.com/2.jpg\ta cat\tasleep\ton a mat\n"
                     "\n"
                     "http://a.com/3.jpg\n"
                     "http://a.com/4.jpg\ttwo\u2028lines\n".encode())
    table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
    assert table["url"].to_pylist() == [f"http://a.com/{i}.jpg" for i in range(1, 5)]
    assert table["caption"].to_pylist() == ["a dog", "a cat asleep on a mat", "", "two\u2028lines"]
    assert "2 lines" in caplog.text and "asleep" in caplog.text

    with_header = tmp_path / "header.tsv"
    with_header.write_text("url\tcaption\tpunsafe\nhttp://b/1.jpg\tx\t0.5\nhttp://b/2.jpg\ty\tz\t0.25\n")
    table = read_url_list(SourceConfig(name="h", path=with_header, kind="cc12m_tsv", extra_cols=["punsafe"]))
    assert table["caption"].to_pylist() == ["x", "y z"]
    assert table["punsafe"].to_pylist() == [0.5, 0.25]


def test_a_compressed_tsv_is_read_by_its_name_on_both_read_paths(tmp_path):
    lines = b"http://a.com/1.jpg\ta dog\rrunning\nhttp://a.com/2.jpg\ta cat\tasleep\n"
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress)):
        path = tmp_path / f"cc12m.tsv{suffix}"
        path.write_bytes(compress(lines))
        table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
        assert table["caption"].to_pylist() == ["a dog running", "a cat asleep"]  # the second line repaired


def test_only_a_newline_ends_a_tsv_line_and_a_lone_carriage_return_is_a_space(tmp_path):
    path = tmp_path / "cc12m.tsv"
    path.write_bytes(b"http://a/1.jpg\tfirst caption\rcontinued\nhttp://a/2.jpg\tsecond\r\n")
    table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
    assert table["url"].to_pylist() == ["http://a/1.jpg", "http://a/2.jpg"]
    assert table["caption"].to_pylist() == ["first caption continued", "second"]

    # The same where a line needs repair (a tab too many), which reads the file again line by line.
    path.write_bytes(b"http://a/1.jpg\tfirst\rcaption\nhttp://a/2.jpg\tsecond\tpart\r\nhttp://a/3.jpg\tthird\n")
    table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
    assert table["caption"].to_pylist() == ["first caption", "second part", "third"]

    # pyarrow reads 1 MiB at a time: the first caption is padded so that the first read ends inside a \r\n.
    lines = [b"http://a/%d.jpg\ta dog\r\n" % i for i in range(100_000)]
    size = 0
    for line in lines:
        if size + len(line) > 1 << 20:
            break
        size += len(line)
    lines[0] = lines[0].replace(b"dog", b"dog" + b"!" * ((1 << 20) + 1 - size))
    path.write_bytes(b"".join(lines))
    assert path.read_bytes()[(1 << 20) - 1 : (1 << 20) + 1] == b"\r\n"
    table = read_url_list(SourceConfig(name="cc12m", path=path, kind="cc12m_tsv", header=False))
    assert table["url"].to_pylist() == [f"http://a/{i}.jpg" for i in range(100_000)]
    assert table["caption"].to_pylist()[1:] == ["a dog"] * 99_999


def test_a_tsv_whose_lines_end_in_a_lone_carriage_return_is_refused_not_read_as_one_row(tmp_path):
    path = tmp_path / "mac.tsv"
    for header, data in ((False, b"http://a/1.jpg\tone\rhttp://a/2.jpg\ttwo\r"),
                         (True, b"url\tcaption\rhttp://a/1.jpg\tone\rhttp://a/2.jpg\ttwo")):
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"mac.tsv ends its lines with a lone \\r \(\d of them, and no \\n\)"):
            read_url_list(SourceConfig(name="mac", path=path, kind="cc12m_tsv", header=header))


def test_missing_column_names_column_file_and_available(tmp_path):
    path = laion_parquet(tmp_path / "laion.parquet", 2)
    source = SourceConfig(name="laion", path=path, url_col="URL", caption_col="caption")
    with pytest.raises(ValueError) as err:
        read_url_list(source)
    message = str(err.value)
    assert "'caption'" in message and str(path) in message and "URL, TEXT" in message


@pytest.mark.parametrize("column, values, what", [
    ("url", pa.array([b"http://a/1.jpg", b"http://a/\xff.jpg"], pa.binary()), "text"),
    ("caption", pa.array([{"x": 1}, {"x": 2}]), "text"),
    ("punsafe", pa.array(["0.1", "high"]), "numeric"),
])
def test_a_column_of_the_wrong_type_names_source_file_and_column(column, values, what, tmp_path):
    columns = {"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["a", "b"], "punsafe": [0.1, 0.2]}
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({**columns, column: values}), path)
    with pytest.raises(ValueError) as err:
        read_url_list(SourceConfig(name="web", path=path, extra_cols=["punsafe"]))
    assert str(err.value).startswith(f"source 'web': column '{column}' in {path} is not {what}: ")


def test_missing_file_and_empty_lists(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_url_list(SourceConfig(name="a", path=tmp_path / "nope.parquet"))
    header_only = tmp_path / "empty.tsv"
    header_only.write_text("url\tcaption\n")
    zero_bytes = tmp_path / "zero.tsv"
    zero_bytes.write_text("")
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), empty_parquet)
    for path, kind in [(header_only, "cc12m_tsv"), (zero_bytes, "cc12m_tsv"), (empty_parquet, "laion_parquet")]:
        table = read_url_list(SourceConfig(name="e", path=path, kind=kind))
        assert table.num_rows == 0
        assert shard_url_list(table, "e", 10) == []


def test_shards_are_numbered_stably_as_the_list_grows(tmp_path):
    def read(path, n):
        return read_url_list(SourceConfig(name="s", path=laion_parquet(path, n), url_col="URL", caption_col="TEXT"))

    short, longer = read(tmp_path / "a.parquet", 7), read(tmp_path / "b.parquet", 12)
    first = shard_url_list(short, "s", 3)
    second = shard_url_list(longer, "s", 3)
    assert [k for k, _ in first] == ["s-00000", "s-00001", "s-00002"]
    assert [k for k, _ in second] == ["s-00000", "s-00001", "s-00002", "s-00003"]
    assert [t.num_rows for _, t in second] == [3, 3, 3, 3]
    for (_, a), (_, b) in zip(first[:2], second[:2]):
        assert a.equals(b)  # full shards do not change when the list grows
    assert first[2][1]["key"].to_pylist() == ["s-000000006"]
    keys = [k for _, t in second for k in t["key"].to_pylist()]
    assert keys == [f"s-{i:09d}" for i in range(12)]
    assert second[0][1].schema == URLS


def test_write_url_shards_leaves_identical_files_untouched(tmp_path):
    list_path = laion_parquet(tmp_path / "list.parquet", 5)
    other = tmp_path / "other.tsv"
    other.write_text("url\tcaption\nhttp://b.com/1.png\tone\n")
    config = PipelineConfig(
        root=tmp_path / "root",
        sources=[
            SourceConfig(name="laion", path=list_path, url_col="URL", caption_col="TEXT"),
            SourceConfig(name="cc", path=other, kind="cc12m_tsv"),
        ],
        shard_size=2,
    )
    keys = ["laion-00000", "laion-00001", "laion-00002", "cc-00000"]
    assert write_url_shards(config) == (keys, [])
    urls_dir = tmp_path / "root" / "urls"
    assert read_parquet(urls_dir / "laion-00002.parquet")["key"].to_pylist() == ["laion-000000004"]
    old = 1_000_000_000
    for path in urls_dir.glob("*.parquet"):
        os.utime(path, (old, old))

    laion_parquet(list_path, 6)  # the list grows by one row: only the last shard changes
    assert write_url_shards(config) == (keys, [])
    mtimes = {p.name: p.stat().st_mtime for p in urls_dir.glob("*.parquet")}
    assert mtimes["laion-00000.parquet"] == old and mtimes["laion-00001.parquet"] == old
    assert mtimes["cc-00000.parquet"] == old
    assert mtimes["laion-00002.parquet"] != old
    assert read_parquet(urls_dir / "laion-00002.parquet").num_rows == 2
    assert sorted(p.name for p in urls_dir.iterdir()) == sorted(f"{k}.parquet" for k in keys)


def test_shards_no_source_produces_any_more_leave_the_dataset(tmp_path):
    list_path = laion_parquet(tmp_path / "list.parquet", 5)
    other = tmp_path / "other.tsv"
    other.write_text("url\tcaption\nhttp://b.com/1.png\tone\n")
    sources = [SourceConfig(name="laion", path=list_path, url_col="URL", caption_col="TEXT"),
               SourceConfig(name="cc", path=other, kind="cc12m_tsv")]
    config = PipelineConfig(root=tmp_path / "root", sources=sources, shard_size=2)
    write_url_shards(config)

    laion_parquet(list_path, 3)  # a shorter list
    config.sources = sources[:1]  # and a source taken out
    assert write_url_shards(config) == (["laion-00000", "laion-00001"], ["cc-00000", "laion-00002"])
    assert DataLayout(config.root).shards() == ["laion-00000", "laion-00001"]

    config.shard_size = 4  # renumbered: the same keys, other rows
    assert write_url_shards(config) == (["laion-00000"], ["laion-00001"])
    assert read_parquet(config.root / "urls" / "laion-00000.parquet").num_rows == 3


def test_pipeline_config_paths_are_relative_to_its_file_and_expand_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pipeline.yaml").write_text(
        "root: ../out\nsources:\n  - {name: web, kind: laion_parquet, path: ~/lists/urls.parquet}\n"
    )
    config = PipelineConfig.from_yaml(tmp_path / "configs" / "pipeline.yaml")
    assert config.root == tmp_path / "out"
    assert config.sources[0].path == tmp_path / "home" / "lists" / "urls.parquet"


def test_two_sources_making_one_shard_key_are_refused_before_anything_is_written(tmp_path):
    pq.write_table(pa.table({"url": ["http://x/1.jpg", "http://x/2.jpg"], "caption": ["a", "b"]}), tmp_path / "list.parquet")
    (tmp_path / "downloaded").mkdir()  # img2dataset output of source "a" with a shard file named b-00000
    pq.write_table(pa.table({"key": ["000000001"], "url": ["http://y/1.jpg"], "caption": ["c"], "status": ["success"]}),
                   tmp_path / "downloaded" / "b-00000.parquet")
    config = PipelineConfig(root=tmp_path / "root", sources=[
        SourceConfig(name="a-b", path=tmp_path / "list.parquet"),
        SourceConfig(name="a", path=tmp_path / "downloaded", kind="img2dataset"),
    ])
    with pytest.raises(ValueError, match="shard key 'a-b-00000' is made 2 times"):
        write_url_shards(config)
    assert not (tmp_path / "root" / "urls").exists()


@pytest.mark.parametrize("column", ["key", "source", "url"])
def test_extra_columns_the_pipeline_makes_itself_are_refused(column, tmp_path):
    with pytest.raises(ConfigError, match=f"extra_cols '{column}' is a column the pipeline makes"):
        SourceConfig(name="web", path=tmp_path / "list.parquet", extra_cols=[column])
