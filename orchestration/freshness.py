"""Which shards' stages `sd3 data run` can skip: the memoization of Dagster's versioning guide (same code
version, same input data versions: same output), decided before any run is launched, so an up-to-date
partition costs no run at all.

A shard's stage is up to date when its latest materialization in the instance
- has the stage's current code version (CODE_VERSION plus a digest of the settings it reads),
- read inputs whose versions are the current ones (content digests, recorded by the asset as it read them),
- and wrote files that are still there with the size and mtime it recorded.

An input's current version is its upstream's recorded data version while the upstream's files are intact,
so checking costs a stat per file, not a read (a file touched or replaced outside Dagster is hashed). Versions are content digests: a stage run again that writes
the same bytes leaves everything downstream up to date (a filter rerun never re-captions a shard).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa

from assets.pipeline import download_inputs, stage_code_versions
from etl.config import PipelineConfig
from etl.filter import dedup_version
from etl.layout import DataLayout
from etl.sources import imported_shards
from etl.storage import read_parquet
from orchestration import partitions
from orchestration.records import current_version, latest_materializations

class Freshness:
    """Answers, stage by stage in pipeline order, which partitions must run. Ask about a stage only once
    the stages upstream of it have run: their new materializations are its current inputs."""

    def __init__(self, instance: dg.DagsterInstance, config: PipelineConfig):
        self.instance, self.config, self.layout = instance, config, DataLayout(config.root)
        self.code_versions = stage_code_versions(config)

    def to_run(self, asset: str, keys: list) -> list:
        """The partition keys (as `sd3 data run` launches them) of ``asset`` that are not up to date."""
        latest = latest_materializations(self.instance, asset)
        current_inputs = self.input_versions(asset)
        stale = []
        for key in keys:
            done = latest.get(str(key))
            fresh = (done is not None and done.code_version == self.code_versions[asset]  # cheapest first
                     and done.intact() and done.inputs == current_inputs(key))
            if not fresh:
                stale.append(key)
        return stale

    def input_versions(self, asset: str):
        """A function of a partition key: the versions of the inputs the stage would read now."""
        layout = self.layout
        if asset == "downloaded":
            imported = imported_shards(self.config)
            return lambda shard: download_inputs(current_version(None, layout.urls(shard)), imported.get(shard))
        if asset == "filtered":
            downloaded = self._current_versions("downloaded")
            winners = _winners(layout) if self.config.filter.dedup else None

            def filter_inputs(shard):
                if downloaded.get(shard) is None:
                    return None
                hashes = read_parquet(layout.downloaded(shard), columns=["key", "sha256"])
                return {"downloaded": downloaded[shard], "dedup": dedup_version(hashes, winners, self.config.filter)}

            return filter_inputs
        if asset == "recaptioned":
            filtered = self._current_versions("filtered")
            return lambda shard: {"filtered": filtered.get(shard)}
        if asset == "bucketed":
            recaptioned = self._current_versions("recaptioned")
            return lambda key: {"recaptioned": recaptioned.get(partitions.split_multi_key(key)[0])}
        raise ValueError(f"not a per-shard stage: {asset}")

    def _current_versions(self, asset: str) -> dict[str, str | None]:
        """{partition: the data version of its kept rows' file}: as recorded while its files are intact, else
        the file's digest (touched or replaced outside Dagster), None when it is gone."""
        return {partition: current_version(done, self._kept_file(asset, partition))
                for partition, done in latest_materializations(self.instance, asset).items()}

    def _kept_file(self, asset: str, partition: str) -> Path:
        return {"downloaded": self.layout.downloaded, "filtered": self.layout.filtered,
                "recaptioned": self.layout.recaptioned}[asset](partition)


def _winners(layout: DataLayout) -> pa.Table | None:
    path = layout.duplicate_winners()
    return read_parquet(path) if path.exists() else None
