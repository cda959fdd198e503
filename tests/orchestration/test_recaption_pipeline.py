"""`sd3 data run` with the `transformers` recaption backend: tiny LLaVA-NeXT and Llama models saved to
local folders, the demo source served on loopback, every asset materialized through Dagster."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from etl.demo_source import make_demo_source
from etl.layout import DataLayout
from etl.report import pipeline_report
from etl.serve import serve_directory
from tests.etl.tiny_captioners import save_tiny_captioners


@pytest.mark.slow
def test_demo_source_recaptioned_by_local_models_end_to_end(tmp_path, monkeypatch):
    vlm, llm = save_tiny_captioners(tmp_path / "models")
    source = tmp_path / "source"
    source.mkdir()
    with serve_directory(source) as base_url:
        urls = make_demo_source(source, 12, base_url, seed=3)
        config = tmp_path / "pipeline.yaml"
        config.write_text(yaml.safe_dump({
            "root": str(tmp_path / "run"),
            "sources": [{"name": "demo", "path": str(urls)}],
            "shard_size": 6,
            "download": {"processes": 1, "threads": 4, "timeout": 5},
            "recaption": {"backend": "transformers", "vlm": str(vlm), "llm": str(llm), "batch_size": 4,
                          "max_new_tokens": 24, "short_max_new_tokens": 16, "device": "cpu", "chunk_rows": 4},
            "buckets": {"resolutions": [64]},
        }))
        env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home")}
        result = subprocess.run([sys.executable, "-m", "orchestration.cli", "data", "run", "--config", str(config)],
                                env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    layout = DataLayout(tmp_path / "run")
    report = pipeline_report(layout, [64])
    assert report.balanced and report.input_rows == 12, report.table()
    captioned = pa.concat_tables([pq.read_table(layout.recaptioned(s)) for s in layout.shards()])
    rejected = sum(rows for (stage, _), rows in report.rejects.items() if stage == "recaption")
    assert captioned.num_rows + rejected == 12
    # The captions came from the models, not from the alt text.
    for alt, detailed, short in zip(captioned["caption"].to_pylist(), captioned["recaption"].to_pylist(),
                                    captioned["recaption_short"].to_pylist()):
        assert detailed.strip() and short.strip() and detailed != alt

    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("recaptioned"))
        metadata = event.asset_materialization.metadata
    assert metadata["backend"].value == "transformers"
    assert "rows_captioned" in metadata and "mean_words_recaption" in metadata
