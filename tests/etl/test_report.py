"""The books over a pipeline root: every input row kept or rejected exactly once at every resolution."""

from __future__ import annotations

import pyarrow as pa
import pytest

from etl.layout import DataLayout
from etl.report import pipeline_report
from etl.schema import URLS, conform, make_rejects
from etl.storage import write_parquet_atomic


@pytest.mark.parametrize("stage_column", ["bucket_{r}", "bucket"])  # "bucket": shards bucketed before 2026-12
def test_a_row_rejected_by_the_bucket_stage_at_each_resolution_counts_once_at_each(tmp_path, stage_column):
    layout = DataLayout(tmp_path)
    keys = ["s-000000000", "s-000000001"]
    urls = conform(pa.table({"key": keys, "url": ["http://x/0", "http://x/1"]}), URLS)
    write_parquet_atomic(urls, layout.urls("s-00000"))
    for r in (256, 512):
        write_parquet_atomic(pa.table({"key": keys[:1]}), layout.bucketed(r, "s-00000"))
        rejects = make_rejects(keys[1:], ["http://x/1"], stage_column.format(r=r), ["decode_error"])
        write_parquet_atomic(rejects, layout.rejects(f"bucket_{r}", "s-00000"))

    report = pipeline_report(layout, [256, 512])
    assert report.balanced, report.table()
    assert report.kept == {256: 1, 512: 1}
    assert report.rejects == {("bucket_256", "decode_error"): 1, ("bucket_512", "decode_error"): 1}


def test_rejects_of_shards_and_resolutions_no_longer_made_leave_the_books(tmp_path):
    layout = DataLayout(tmp_path)
    keys = [f"s-{i:09d}" for i in range(4)]
    for shard, rows in (("s-00000", keys[:2]), ("s-00001", keys[2:])):  # shard_size 2, then 4
        rejects = make_rejects(rows, [f"ftp://x/{k}" for k in rows], "download", ["invalid_url"] * 2)
        write_parquet_atomic(rejects, layout.rejects("download", shard))
    urls = conform(pa.table({"key": keys, "url": [f"ftp://x/{k}" for k in keys]}), URLS)
    write_parquet_atomic(urls, layout.urls("s-00000"))  # the one shard there is now, all four rows
    write_parquet_atomic(make_rejects(keys, [""] * 4, "download", ["invalid_url"] * 4), layout.rejects("download", "s-00000"))
    # A resolution taken out of buckets.resolutions: its rejects stay on disk, out of the books.
    write_parquet_atomic(make_rejects(keys[:1], [""], "bucket_1024", ["too_small"]), layout.rejects("bucket_1024", "s-00000"))

    report = pipeline_report(layout, [256])
    assert report.balanced, report.table()
    assert report.rejects == {("download", "invalid_url"): 4}


def test_shards_of_sources_with_other_extra_columns_are_counted_together(tmp_path):
    layout = DataLayout(tmp_path)
    for shard, extra in (("laion-00000", {"aesthetic": [6.5]}), ("cc-00000", {})):
        key = f"{shard[:-6]}-000000000"
        table = pa.table({"key": [key], "url": [f"http://x/{key}"], **extra})
        write_parquet_atomic(conform(table, URLS), layout.urls(shard))  # extras carried, as read_url_list's
        write_parquet_atomic(table.select(["key", *extra]), layout.bucketed(256, shard))
    report = pipeline_report(layout, [256])
    assert report.balanced and report.input_rows == 2 and report.kept == {256: 2}, report.table()
