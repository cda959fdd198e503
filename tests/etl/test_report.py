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
