"""The data lineage as software-defined assets: url_shards -> downloaded -> content_hashes -> filtered
-> recaptioned -> bucketed (per resolution) -> bucket_index.

Each asset is a thin wrapper: read its input shard, call one function from etl/, check the books, write
the kept rows and the rejects atomically, and report counts, a content-derived data version and a few
previews as metadata. Assets write their own files (paths from etl.layout), so no IO manager is involved.
"""


import base64
import hashlib
import io
import shutil
import time
import warnings
from pathlib import Path

import dagster as dg
import pyarrow as pa
from PIL import Image

from etl.accounting import check_accounting, reject_where
from etl.buckets import bucket_shard, bucket_size, write_bucketed
from etl.download import download_shard
from etl.filter import HASH_CANDIDATE_COLUMNS, duplicate_winners, filter_shard, hash_candidates
from etl.index import bucket_histogram, build_index, dataset_version, duplicate_keys
from etl.invariants import bucketed_violations
from etl.recaption import get_captioner, recaption_shard
from etl.schema import StepResult
from etl.sources import write_url_shards
from etl.storage import read_parquet, write_parquet_atomic
from orchestration import partitions
from orchestration.resources import PipelineResource

# Mapping a (shard, resolution) partition to its shard or resolution is a beta API in Dagster; it is the
# documented way to express this lineage, so its warning is noise here.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

# Bump when a stage's code changes what it writes, so Dagster marks its outputs stale.
CODE_VERSION = "1"
GROUP = "data"


def file_version(*paths: Path) -> dg.DataVersion:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return dg.DataVersion(digest.hexdigest()[:16])


def write_step(result: StepResult, kept_path: Path, rejects_path: Path, write_kept=write_parquet_atomic) -> None:
    write_parquet_atomic(result.rejects, rejects_path)
    write_kept(result.kept, kept_path)


def step_metadata(result: StepResult, rows_in: int, seconds: float, path: Path) -> dict:
    counts = result.counts
    return {
        "rows_in": rows_in,
        "rows_out": counts["kept"],
        "rejected": rows_in - counts["kept"],
        "rejects_by_reason": dg.MetadataValue.json({k: v for k, v in counts.items() if k != "kept"}),
        "rows_per_s": round(rows_in / seconds, 2) if seconds > 0 else 0.0,
        "path": dg.MetadataValue.path(str(path)),
    }


def thumbnails(table: pa.Table, count: int = 4, side: int = 96) -> dg.MetadataValue:
    """A few previews inline, so the UI shows what a shard holds without opening files."""
    cells = []
    for row in table.slice(0, count).to_pylist():
        with Image.open(io.BytesIO(row["image"])) as img:
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
        data = base64.b64encode(buf.getvalue()).decode()
        caption = (row.get("recaption_short") or row.get("caption") or "").replace("|", " ")[:60]
        cells.append(f"![{row['key']}](data:image/png;base64,{data}) {row['height']}x{row['width']}: {caption}")
    return dg.MetadataValue.md("\n\n".join(cells) or "(no rows)")


def build_pipeline_assets(resolutions: list[int]) -> list[dg.AssetsDefinition]:
    shards = partitions.shards
    by_resolution = partitions.shard_by_resolution(resolutions)

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, kinds={"parquet"})
    def url_shards(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """URL lists split into shards of `shard_size` rows; registers one partition per shard."""
        keys = write_url_shards(pipeline.config)
        new = [k for k in keys if not context.instance.has_dynamic_partition(shards.name, k)]
        if new:
            context.instance.add_dynamic_partitions(shards.name, new)
        layout = pipeline.layout
        rows = sum(read_parquet(layout.urls(k), columns=["key"]).num_rows for k in keys)
        return dg.MaterializeResult(
            metadata={"shards": len(keys), "new_shards": len(new), "rows": rows,
                      "shard_keys": dg.MetadataValue.json(keys)},
            data_version=file_version(*[layout.urls(k) for k in keys]) if keys else dg.DataVersion("empty"),
        )

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, partitions_def=shards, deps=[url_shards],
              kinds={"parquet"})
    def downloaded(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Images fetched by img2dataset with their original bytes; failures become rejects with reasons."""
        shard, layout = context.partition_key, pipeline.layout
        urls = read_parquet(layout.urls(shard))
        start = time.perf_counter()
        result = download_shard(urls, layout.work("download", shard), pipeline.config.download)
        check_accounting(urls["key"], result, "download")
        write_step(result, layout.downloaded(shard), layout.rejects("download", shard))
        return dg.MaterializeResult(
            metadata=step_metadata(result, urls.num_rows, time.perf_counter() - start, layout.downloaded(shard)),
            data_version=file_version(layout.downloaded(shard)),
        )

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, deps=[downloaded], kinds={"parquet"})
    def content_hashes(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """For each image content hash over the whole dataset, the one row that keeps it (smallest key).

        Deciding duplicates from this global table keeps exact-duplicate removal correct whatever order
        the shards are filtered in.
        """
        layout, cfg = pipeline.layout, pipeline.config
        present = [s for s in layout.shards() if layout.downloaded(s).exists()]
        missing = len(layout.shards()) - len(present)
        candidates = (
            hash_candidates(read_parquet(layout.downloaded(s), columns=HASH_CANDIDATE_COLUMNS), cfg.filter)
            for s in present
        )
        winners = duplicate_winners(candidates)
        write_parquet_atomic(winners, layout.duplicate_winners())
        if missing:
            context.log.warning(f"{missing} shards are not downloaded yet; their hashes are not included")
        return dg.MaterializeResult(
            metadata={"unique_images": winners.num_rows, "shards": len(present), "shards_missing": missing},
            data_version=file_version(layout.duplicate_winners()),
        )

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, partitions_def=shards,
              deps=[downloaded, content_hashes], kinds={"parquet"})
    def filtered(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Undecodable, too small, unsafe, watermarked and duplicate images removed."""
        shard, layout, cfg = context.partition_key, pipeline.layout, pipeline.config
        table = read_parquet(layout.downloaded(shard))
        start = time.perf_counter()
        winners = read_parquet(layout.duplicate_winners()) if cfg.filter.dedup else None
        result = filter_shard(table, winners, cfg.filter)
        # A row that cannot fill a bucket at the smallest resolution is dropped here, so every row that
        # survives the filter lands in the buckets of every resolution (the accounting contract).
        smallest = min(cfg.buckets.resolutions)
        unbucketable = [
            bucket_size(h, w, smallest, cfg.buckets.multiple) is None
            for h, w in zip(result.kept["height"].to_pylist(), result.kept["width"].to_pylist())
        ]
        result = reject_where(result, unbucketable, "filter", "too_small_for_bucket",
                              f"a side rounds to 0 at resolution {smallest}")
        check_accounting(table["key"], result, "filter")
        write_step(result, layout.filtered(shard), layout.rejects("filter", shard))
        return dg.MaterializeResult(
            metadata=step_metadata(result, table.num_rows, time.perf_counter() - start, layout.filtered(shard)),
            data_version=file_version(layout.filtered(shard)),
        )

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, partitions_def=shards, deps=[filtered],
              pool="recaption", kinds={"parquet"})
    def recaptioned(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """A detailed and a short caption per image (VLM then LLM; `alt-text` for smoke runs)."""
        shard, layout, cfg = context.partition_key, pipeline.layout, pipeline.config
        table = read_parquet(layout.filtered(shard))
        start = time.perf_counter()
        work = layout.work("recaption", shard)
        result = recaption_shard(table, cfg.recaption, work, captioner=get_captioner(cfg.recaption))
        check_accounting(table["key"], result, "recaption")
        write_step(result, layout.recaptioned(shard), layout.rejects("recaption", shard))
        shutil.rmtree(work, ignore_errors=True)
        metadata = step_metadata(result, table.num_rows, time.perf_counter() - start, layout.recaptioned(shard))
        metadata.update(result.stats.as_metadata())
        metadata["backend"] = cfg.recaption.backend
        return dg.MaterializeResult(metadata=metadata, data_version=file_version(layout.recaptioned(shard)))

    @dg.asset(
        group_name=GROUP,
        code_version=CODE_VERSION,
        partitions_def=by_resolution,
        deps=[dg.AssetDep(recaptioned, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("shard"))],
        check_specs=[dg.AssetCheckSpec("bucket_invariants", asset="bucketed", blocking=True,
                                       description="sides multiple of 16, long side <= R, stored image decodes "
                                                   "to its recorded size in RGB, captions present, keys unique")],
        kinds={"parquet"},
    )
    def bucketed(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Images resized into aspect-ratio buckets (height, width) with the long side at most R."""
        shard, resolution = partitions.split_multi_key(context.partition_key)
        layout, cfg = pipeline.layout, pipeline.config
        table = read_parquet(layout.recaptioned(shard))
        start = time.perf_counter()
        result = bucket_shard(table, resolution, cfg.buckets)
        check_accounting(table["key"], result, f"bucket_{resolution}")
        out = layout.bucketed(resolution, shard)
        write_step(result, out, layout.rejects(f"bucket_{resolution}", shard), write_kept=write_bucketed)
        violations = bucketed_violations(result.kept, resolution, cfg.buckets.multiple)
        metadata = step_metadata(result, table.num_rows, time.perf_counter() - start, out)
        metadata["bucket_histogram"] = dg.MetadataValue.json(bucket_histogram(
            result.kept.select(["key", "height", "width"])))
        metadata["preview"] = thumbnails(result.kept)
        return dg.MaterializeResult(
            metadata=metadata,
            data_version=file_version(out),
            check_results=[dg.AssetCheckResult(
                check_name="bucket_invariants",
                passed=not any(violations.values()),
                metadata={name: dg.MetadataValue.json(keys[:20]) for name, keys in violations.items()},
            )],
        )

    @dg.asset(
        group_name=GROUP,
        code_version=CODE_VERSION,
        partitions_def=partitions.resolutions(resolutions),
        deps=[dg.AssetDep(bucketed, partition_mapping=dg.MultiToSingleDimensionPartitionMapping("resolution"))],
        check_specs=[dg.AssetCheckSpec("index_keys_unique", asset="bucket_index", blocking=True)],
        kinds={"parquet"},
    )
    def bucket_index(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Bucket -> rows over all shards of one resolution: what the trainer's bucket sampler reads."""
        resolution, layout = int(context.partition_key), pipeline.layout
        all_shards = layout.shards()
        paths = [layout.bucketed(resolution, s) for s in all_shards if layout.bucketed(resolution, s).exists()]
        index = build_index(paths)
        write_parquet_atomic(index, layout.index(resolution))
        repeated, repeated_keys = duplicate_keys(index)
        version, histogram = dataset_version(index), bucket_histogram(index)
        return dg.MaterializeResult(
            metadata={
                "rows": index.num_rows,
                "shards_indexed": len(paths),
                "shards_missing": len(all_shards) - len(paths),
                "buckets": len(histogram),
                "bucket_histogram": dg.MetadataValue.json(histogram),
                "dataset_version": version,
                "path": dg.MetadataValue.path(str(layout.index(resolution))),
            },
            data_version=dg.DataVersion(version),
            check_results=[dg.AssetCheckResult(check_name="index_keys_unique", passed=not repeated,
                                               metadata={"duplicates": repeated,
                                                         "duplicate_keys": dg.MetadataValue.json(repeated_keys)})],
        )

    return [url_shards, downloaded, content_hashes, filtered, recaptioned, bucketed, bucket_index]
