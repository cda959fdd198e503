"""Partitions: one per URL shard (registered dynamically), times the configured bucket resolutions."""

from __future__ import annotations

import dagster as dg

# Shard keys are registered by the `url_shards` asset when it splits the URL lists.
shards = dg.DynamicPartitionsDefinition(name="shards")


def resolutions(values: list[int]) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(r) for r in values])


def shard_by_resolution(values: list[int]) -> dg.MultiPartitionsDefinition:
    return dg.MultiPartitionsDefinition({"shard": shards, "resolution": resolutions(values)})


def split_multi_key(key: dg.MultiPartitionKey) -> tuple[str, int]:
    dims = key.keys_by_dimension
    return dims["shard"], int(dims["resolution"])
