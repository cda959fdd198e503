"""Which shards' stages `sd3 data run` can skip: the memoization of Dagster's versioning guide (same code
version, same input data versions: same output), decided before any run is launched, so an up-to-date
partition costs no run at all.

A shard's stage is up to date when its latest materialization in the instance
- has the stage's current code version (CODE_VERSION plus a digest of the settings it reads),
- read inputs whose versions are the current ones (content digests, recorded by the asset as it read them),
- and wrote files that are still there with the size and mtime it recorded.

An input's current version is its upstream's recorded data version while the upstream's files are intact,
so checking costs a stat per file, not a read. Versions are content digests: a stage run again that writes
the same bytes leaves everything downstream up to date (a filter rerun never re-captions a shard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa

from assets.pipeline import stage_code_versions
from etl.config import PipelineConfig
from etl.filter import dedup_version
from etl.layout import DataLayout
from etl.storage import content_version, read_parquet
from orchestration import partitions

# Storage ids fetched per query when reading the latest materialization of every partition.
_PAGE = 500


@dataclass(frozen=True)
class Materialized:
    """What the freshness rule reads of a partition's latest materialization."""

    code_version: str | None
    data_version: str | None
    inputs: dict
    outputs: dict  # path -> [size, mtime_ns]

    def intact(self) -> bool:
        """Its files are still the ones it wrote (or it predates the record: then never)."""
        if not self.outputs:
            return False
        for path, (size, mtime_ns) in self.outputs.items():
            try:
                stat = Path(path).stat()
            except FileNotFoundError:
                return False
            if (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
                return False
        return True


def latest_materializations(instance: dg.DagsterInstance, asset: str) -> dict[str, Materialized]:
    """{partition key: its latest materialization} of a partitioned asset."""
    key = dg.AssetKey(asset)
    storage_ids = list(instance.get_latest_storage_id_by_partition(key, dg.DagsterEventType.ASSET_MATERIALIZATION)
                       .values())
    latest = {}
    for start in range(0, len(storage_ids), _PAGE):
        page = storage_ids[start : start + _PAGE]
        records = instance.fetch_materializations(dg.AssetRecordsFilter(key, storage_ids=page), limit=len(page))
        for record in records.records:
            event = record.asset_materialization
            tags, metadata = event.tags or {}, event.metadata
            latest[event.partition] = Materialized(
                code_version=tags.get("dagster/code_version"),
                data_version=tags.get("dagster/data_version"),
                inputs=metadata["inputs"].value if "inputs" in metadata else {},
                outputs=metadata["outputs"].value if "outputs" in metadata else {},
            )
    return latest


class Freshness:
    """Answers, stage by stage in pipeline order, which partitions must run. Ask about a stage only once
    the stages upstream of it have run: their new materializations are its current inputs."""

    def __init__(self, instance: dg.DagsterInstance, config: PipelineConfig):
        self.instance, self.config, self.layout = instance, config, DataLayout(config.root)
        self.code_versions = stage_code_versions(config)

    def to_run(self, asset: str, keys: list) -> list:
        """The partition keys (as `sd3 data run` launches them) of ``asset`` that are not up to date."""
        latest = latest_materializations(self.instance, asset)
        current_inputs = self._input_versions(asset)
        stale = []
        for key in keys:
            done = latest.get(str(key))
            fresh = (done is not None and done.code_version == self.code_versions[asset]
                     and done.inputs == current_inputs(key) and done.intact())
            if not fresh:
                stale.append(key)
        return stale

    def _input_versions(self, asset: str):
        """A function of a partition key: the versions of the inputs the stage would read now."""
        layout = self.layout
        if asset == "downloaded":
            return lambda shard: {"urls": _version_of_file(layout.urls(shard))}
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
        """{partition: the data version of its files on disk}: as recorded while they are intact, else None."""
        return {partition: done.data_version if done.intact() else None
                for partition, done in latest_materializations(self.instance, asset).items()}


def _version_of_file(path: Path) -> str | None:
    return content_version(path) if path.exists() else None


def _winners(layout: DataLayout) -> pa.Table | None:
    path = layout.duplicate_winners()
    return read_parquet(path) if path.exists() else None
