"""The latest materialization of every partition of an asset, as read from the Dagster instance: what the
freshness rule (orchestration/freshness.py) and the bucket index's dataset version rely on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from etl.storage import content_version

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
            latest[record.asset_materialization.partition] = _materialized(record.asset_materialization)
    return latest


def latest_materialization(instance: dg.DagsterInstance, asset: str, partition: str) -> Materialized | None:
    """The latest materialization of one partition of ``asset``; None when it has none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(dg.AssetKey(asset), asset_partitions=[partition]), limit=1)
    return _materialized(records.records[0].asset_materialization) if records.records else None


def _materialized(event: dg.AssetMaterialization) -> Materialized:
    tags, metadata = event.tags or {}, event.metadata
    return Materialized(
        code_version=tags.get("dagster/code_version"),
        data_version=tags.get("dagster/data_version"),
        inputs=metadata["inputs"].value if "inputs" in metadata else {},
        outputs=metadata["outputs"].value if "outputs" in metadata else {},
    )


def current_version(done: Materialized | None, path: Path) -> str | None:
    """The content version of ``path`` now, a file materialization ``done`` wrote (None: no record): as
    recorded while its files are intact, else the file's digest (touched or replaced outside Dagster),
    None when the file is gone."""
    if done is not None and done.intact():
        return done.data_version
    return content_version(path) if path.exists() else None
