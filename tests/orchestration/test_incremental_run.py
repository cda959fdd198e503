"""`sd3 data run` again: what is up to date is skipped, what changed runs, and only that.

One demo pipeline (real img2dataset downloads from a loopback server, every Dagster asset) taken through
the changes a dataset sees: nothing, a lost output file, a setting that changes nothing downstream, a grown
URL list, and forced stages. What ran is read from the Dagster instance, not from the command's output.
"""

from __future__ import annotations

import hashlib

import dagster as dg
import pytest
import yaml

from etl.demo_source import make_demo_source
from etl.index import dataset_version
from etl.layout import DataLayout
from etl.serve import serve_directory
from etl.storage import read_parquet
from orchestration.run import run_pipeline

pytestmark = pytest.mark.slow

SHARD_SIZE = 6
STAGES = ("downloaded", "filtered", "recaptioned", "bucketed")


def materializations(instance: dg.DagsterInstance) -> dict[str, dict[str, int]]:
    """{asset: {partition: how many times it was materialized}}."""
    counts = {}
    for asset in STAGES:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=10_000).records
        per_partition = {}
        for record in records:
            partition = record.asset_materialization.partition
            per_partition[partition] = per_partition.get(partition, 0) + 1
        counts[asset] = per_partition
    return counts


def ran_since(before: dict, after: dict) -> dict[str, set[str]]:
    return {asset: {p for p, n in after[asset].items() if n > before[asset].get(p, 0)} for asset in STAGES}


def _latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1)
    return records.records[0].asset_materialization.metadata


def outputs(root) -> dict[str, tuple[int, str]]:
    """{file: (mtime_ns, sha256)} of every stage output."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.glob("[bdfr]*/**/*.parquet"))}


def test_rerun_skips_what_is_up_to_date_and_runs_what_changed(tmp_path, monkeypatch):
    home, source = tmp_path / "home", tmp_path / "source"
    home.mkdir()
    source.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    root = tmp_path / "pipeline"
    layout = DataLayout(root)
    settings = {
        "root": str(root),
        "shard_size": SHARD_SIZE,
        "download": {"processes": 1, "threads": 4, "timeout": 10, "retries": 0},
        "recaption": {"backend": "alt-text"},
        "buckets": {"resolutions": [64]},
    }

    def run(name: str, force=False, **changes) -> tuple[dict[str, set[str]], list[str]]:
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**settings, **changes}))
        lines = []
        with dg.DagsterInstance.get() as instance:
            before = materializations(instance)
        report = run_pipeline(config, log=lines.append, force=force)
        assert report.balanced, report.table()
        with dg.DagsterInstance.get() as instance:
            return ran_since(before, materializations(instance)), lines

    with serve_directory(source) as base_url:
        settings["sources"] = [{"name": "demo", "path": str(make_demo_source(source, 2 * SHARD_SIZE, base_url))}]
        shards = ["demo-00000", "demo-00001"]
        buckets = {f"64|{s}" for s in shards}

        ran, _ = run("first")
        assert ran == {"downloaded": set(shards), "filtered": set(shards), "recaptioned": set(shards),
                       "bucketed": buckets}
        first = outputs(root)
        version = dataset_version(read_parquet(layout.index(64)))

        # Nothing changed: no shard's stage runs, no file is rewritten.
        ran, lines = run("again")
        assert ran == {stage: set() for stage in STAGES}, lines
        assert "[download_job] downloaded: 0 of 2 run(s), 2 up to date" in lines
        assert outputs(root) == first
        assert dataset_version(read_parquet(layout.index(64))) == version

        # A lost output file: that partition runs, and it writes the same bytes.
        layout.bucketed(64, shards[1]).unlink()
        ran, _ = run("lost")
        assert ran == {"downloaded": set(), "filtered": set(), "recaptioned": set(), "bucketed": {f"64|{shards[1]}"}}
        assert {f: digest for f, (_, digest) in outputs(root).items()} == {f: d for f, (_, d) in first.items()}

        # A filter setting that keeps the same rows: the filter runs again, writes the same bytes, and the
        # stages after it (captioning, above all) stay up to date.
        ran, _ = run("watermarks", filter={"max_pwatermark": 0.9})
        assert ran == {"downloaded": set(), "filtered": set(shards), "recaptioned": set(), "bucketed": set()}

        # A grown URL list: only the new shard runs. Its images' hashes join the global dedup table, which
        # changes no decision about the other shards' images.
        make_demo_source(source, 3 * SHARD_SIZE, base_url)
        ran, _ = run("grown", filter={"max_pwatermark": 0.9})
        new = "demo-00002"
        assert ran == {"downloaded": {new}, "filtered": {new}, "recaptioned": {new}, "bucketed": {f"64|{new}"}}
        assert dataset_version(read_parquet(layout.index(64))) != version

        # Forced: every partition of the stage runs, up to date or not, and writes identical files.
        before = outputs(root)
        ran, _ = run("forced", force=["bucketed"], filter={"max_pwatermark": 0.9})
        assert ran == {"downloaded": set(), "filtered": set(), "recaptioned": set(),
                       "bucketed": buckets | {f"64|{new}"}}
        after = outputs(root)
        assert {f: d for f, (_, d) in after.items()} == {f: d for f, (_, d) in before.items()}
        assert any(after[f][0] != before[f][0] for f in after if f.startswith("buckets/"))

        # Downloading forced again: each shard's rows were settled (downloaded, or rejected for good) by the
        # last download with these settings, so nothing is fetched and the same bytes are written.
        ran, _ = run("redownload", force=["downloaded"], filter={"max_pwatermark": 0.9})
        assert ran["downloaded"] == set(shards) | {new} and ran["bucketed"] == set()
        with dg.DagsterInstance.get() as instance:
            for shard in ran["downloaded"]:
                metadata = _latest_metadata(instance, "downloaded", shard)
                assert metadata["rows_reused"].value == metadata["rows_in"].value == SHARD_SIZE, shard
        assert {f: d for f, (_, d) in outputs(root).items()} == {f: d for f, (_, d) in after.items()}

        # Captioning forced again (as after a crash that wrote the shard but recorded nothing): every row's
        # caption is read back from the shard's kept work folder, none is made again.
        ran, _ = run("recaptioned", force=["recaptioned"], filter={"max_pwatermark": 0.9})
        assert ran["recaptioned"] == set(shards) | {new}
        with dg.DagsterInstance.get() as instance:
            for shard in ran["recaptioned"]:
                metadata = _latest_metadata(instance, "recaptioned", shard)
                assert metadata["rows_resumed"].value == metadata["rows_in"].value > 0, shard
        assert {f: d for f, (_, d) in outputs(root).items() if f.startswith("recaptioned/")} == {
            f: d for f, (_, d) in after.items() if f.startswith("recaptioned/")}

    with pytest.raises(ValueError, match="no stage named"):
        run("typo", force=["bucketted"])
