"""The data lineage as software-defined assets: url_shards -> downloaded -> content_hashes -> filtered
-> recaptioned -> bucketed (per resolution) -> bucket_index.

Each asset is a thin wrapper: read its input shard, call one function from etl/, check the books, write
the kept rows and the rejects atomically, and report counts, a content-derived data version and a few
previews as metadata. Assets write their own files (paths from etl.layout), so no IO manager is involved.
"""


import base64
import hashlib
import io
import json
import time
import warnings
from pathlib import Path

import dagster as dg
import pyarrow as pa
from PIL import Image

from etl.accounting import check_accounting, reject_where
from etl.buckets import bucket_shard, bucket_size, bucket_stage, write_bucketed
from etl.config import PipelineConfig
from etl.download import (TRANSIENT_REASONS, download_shard, img2dataset_stamp, import_img2dataset_shard,
                          settled_outcomes)
from etl.filter import HASH_CANDIDATE_COLUMNS, dedup_version, duplicate_winners, filter_shard, hash_candidates
from etl.index import bucket_histogram, build_index, dataset_version, duplicate_keys, with_dataset_version
from etl.invariants import bucketed_violations
from etl.recaption import recaption_shard
from etl.recaption.gpus import on_a_free_gpu
from etl.schema import StepResult
from etl.sources import imported_shards, write_url_shards
from etl.storage import content_version, read_parquet, read_parquet_versioned, write_parquet_atomic
from orchestration import partitions
from orchestration.lifetime import end_with_parent
from orchestration.records import current_version, latest_materialization, latest_materializations
from orchestration.resources import PipelineResource

# Mapping a (shard, resolution) partition to its shard or resolution is a beta API in Dagster; it is the
# documented way to express this lineage, so its warning is noise here.
warnings.filterwarnings("ignore", category=dg.BetaWarning)

# Bump when a stage's code changes what it writes, so Dagster marks its outputs stale.
CODE_VERSION = "1"
GROUP = "data"
SHARD_STAGES = ("downloaded", "filtered", "recaptioned", "bucketed")


def stage_code_versions(config: PipelineConfig) -> dict[str, str]:
    """Each data stage's code version: CODE_VERSION and a digest of the settings its output depends on.

    A changed setting makes that stage's outputs stale, in the UI and for `sd3 data run`. Settings that only
    change speed or where work runs (processes, threads, timeouts, batch sizes, devices) are left out, so
    tuning them never re-downloads or recaptions a dataset.
    """
    download, filters, recaption, buckets = config.download, config.filter, config.recaption, config.buckets
    captioner = ["backend"] if recaption.backend == "alt-text" else [
        "backend", "vlm", "llm", "vlm_prompt", "llm_prompt", "llm_system_prompt", "max_new_tokens",
        "short_max_new_tokens", "max_image_side", "dtype"]
    settings = {
        "downloaded": {"encode_format": download.encode_format,
                       "disallowed_header_directives": download.disallowed_header_directives},
        # The winners are chosen among the rows that pass the thresholds: other thresholds, other winners.
        "content_hashes": {"max_punsafe": filters.max_punsafe, "max_pwatermark": filters.max_pwatermark},
        "filtered": {"min_side": filters.min_side, "max_punsafe": filters.max_punsafe,
                     "max_pwatermark": filters.max_pwatermark, "dedup": filters.dedup,
                     "smallest_resolution": min(buckets.resolutions), "multiple": buckets.multiple},
        "recaptioned": {name: getattr(recaption, name) for name in captioner},
        "bucketed": {"format": buckets.format, "multiple": buckets.multiple,
                     **({} if buckets.format == "png" else {"quality": buckets.quality})},
    }
    # The root too: two configs sharing one Dagster instance must not take each other's outputs as theirs.
    return {stage: f"{CODE_VERSION}-{hashlib.sha256(json.dumps({'root': str(config.root), **values}, sort_keys=True).encode()).hexdigest()[:12]}"
            for stage, values in settings.items()}


def file_version(*paths: Path) -> dg.DataVersion:
    return dg.DataVersion(content_version(*paths))


def download_inputs(urls_version: str | None, imported: tuple | None) -> dict[str, str | None]:
    """What a shard's download stage reads: its URL rows, and for an imported shard the img2dataset file."""
    inputs = {"urls": urls_version}
    if imported is not None:
        inputs["import"] = img2dataset_stamp(imported[1])
    return inputs


def _previous_download(instance: dg.DagsterInstance, shard: str, code_version: str, kept: Path,
                       rejects: Path) -> StepResult | None:
    """The shard's last download, when a download now would make the same rows of it: same settings, and
    its files as it wrote them. Downloading a shard again then fetches only what that one did not settle."""
    done = latest_materialization(instance, "downloaded", shard)
    if done is None or done.code_version != code_version or not done.intact():
        return None
    return StepResult(kept=read_parquet(kept), rejects=read_parquet(rejects))


def provenance(inputs: dict[str, str], *outputs: Path) -> dict:
    """What `sd3 data run` compares before running a shard's stage again (orchestration/freshness.py): the
    versions of the inputs this materialization read, and the size and mtime of the files it wrote."""
    stats = {str(path): [path.stat().st_size, path.stat().st_mtime_ns] for path in outputs}
    return {"inputs": dg.MetadataValue.json(inputs), "outputs": dg.MetadataValue.json(stats)}


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


def build_pipeline_assets(config: PipelineConfig) -> list[dg.AssetsDefinition]:
    resolutions = config.buckets.resolutions
    shards = partitions.shards
    by_resolution = partitions.shard_by_resolution(resolutions)
    versions = stage_code_versions(config)

    @dg.asset(group_name=GROUP, code_version=CODE_VERSION, kinds={"parquet"})
    def url_shards(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """URL lists split into shards of `shard_size` rows (img2dataset output: a shard per shard file);
        registers one partition per shard, and removes those of shards no source produces any more."""
        keys, removed = write_url_shards(pipeline.config)
        new = [k for k in keys if not context.instance.has_dynamic_partition(shards.name, k)]
        if new:
            context.instance.add_dynamic_partitions(shards.name, new)
        for key in removed:
            if context.instance.has_dynamic_partition(shards.name, key):
                context.instance.delete_dynamic_partition(shards.name, key)
        if removed:
            context.log.warning(f"{len(removed)} shards are no longer in the URL lists and left the dataset: "
                                f"{', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
        layout = pipeline.layout
        rows = sum(read_parquet(layout.urls(k), columns=["key"]).num_rows for k in keys)
        return dg.MaterializeResult(
            metadata={"shards": len(keys), "new_shards": len(new), "removed_shards": len(removed), "rows": rows,
                      "shard_keys": dg.MetadataValue.json(keys)},
            data_version=file_version(*[layout.urls(k) for k in keys]) if keys else dg.DataVersion("empty"),
        )

    @dg.asset(group_name=GROUP, code_version=versions["downloaded"], partitions_def=shards, deps=[url_shards],
              kinds={"parquet"})
    def downloaded(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Images fetched by img2dataset with their original bytes; failures become rejects with reasons.
        Downloaded again, a shard fetches only the rows its last download did not settle (``_previous_download``)."""
        shard, layout = context.partition_key, pipeline.layout
        urls, urls_version = read_parquet_versioned(layout.urls(shard))
        start = time.perf_counter()
        imported = imported_shards(pipeline.config).get(shard)
        out, rejects = layout.downloaded(shard), layout.rejects("download", shard)
        settled = {}
        if imported is None:
            previous = _previous_download(context.instance, shard, versions["downloaded"], out, rejects)
            settled = settled_outcomes(urls, previous) if previous is not None else {}
            result = download_shard(urls, layout.work("download", shard), pipeline.config.download, settled)
        else:  # already downloaded: its img2dataset shard file is read, not its URLs
            result = import_img2dataset_shard(imported[1], imported[0].name)
        check_accounting(urls["key"], result, "download")
        if imported is None and result.kept.num_rows == 0 and urls.num_rows and set(
                result.rejects["reason"].to_pylist()) <= TRANSIENT_REASONS:
            # Recorded, this shard would count as downloaded for good: the next run would not try it again.
            raise dg.Failure(description=f"every one of the {urls.num_rows} URLs of {shard} failed with a timeout, "
                                         "a connection error or a 429/502/503/504, on every pass: is the network "
                                         "(or its host) up? Nothing was recorded; run again")
        write_step(result, out, rejects)
        metadata = step_metadata(result, urls.num_rows, time.perf_counter() - start, out)
        metadata["rows_reused"] = len(settled)
        metadata.update(provenance(download_inputs(urls_version, imported), out, rejects))
        return dg.MaterializeResult(metadata=metadata, data_version=file_version(out))

    @dg.asset(group_name=GROUP, code_version=versions["content_hashes"], deps=[downloaded], kinds={"parquet"})
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

    @dg.asset(group_name=GROUP, code_version=versions["filtered"], partitions_def=shards,
              deps=[downloaded, content_hashes], kinds={"parquet"})
    def filtered(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """Undecodable, too small, unsafe, watermarked and duplicate images removed."""
        shard, layout, cfg = context.partition_key, pipeline.layout, pipeline.config
        table, downloaded_version = read_parquet_versioned(layout.downloaded(shard))
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
        out, rejects = layout.filtered(shard), layout.rejects("filter", shard)
        write_step(result, out, rejects)
        metadata = step_metadata(result, table.num_rows, time.perf_counter() - start, out)
        metadata.update(provenance({"downloaded": downloaded_version,
                                    "dedup": dedup_version(table, winners, cfg.filter)}, out, rejects))
        return dg.MaterializeResult(metadata=metadata, data_version=file_version(out))

    @dg.asset(group_name=GROUP, code_version=versions["recaptioned"], partitions_def=shards, deps=[filtered],
              pool="recaption", kinds={"parquet"})
    def recaptioned(context: dg.AssetExecutionContext, pipeline: PipelineResource) -> dg.MaterializeResult:
        """A detailed and a short caption per image (VLM then LLM; `alt-text` for smoke runs)."""
        end_with_parent()  # a step process whose run worker was killed would keep its GPU
        shard, layout, cfg = context.partition_key, pipeline.layout, pipeline.config
        table, filtered_version = read_parquet_versioned(layout.filtered(shard))
        start = time.perf_counter()
        work = layout.work("recaption", shard)  # kept: its captions serve the next run over these rows
        with on_a_free_gpu(cfg.recaption) as captioning:  # the pool runs one recaption step per GPU
            result = recaption_shard(table, captioning, work)  # loads the models only if rows are left
        check_accounting(table["key"], result, "recaption")
        out, rejects = layout.recaptioned(shard), layout.rejects("recaption", shard)
        write_step(result, out, rejects)
        metadata = step_metadata(result, table.num_rows, time.perf_counter() - start, out)
        metadata.update(result.stats.as_metadata())
        metadata["backend"] = cfg.recaption.backend
        metadata.update(provenance({"filtered": filtered_version}, out, rejects))
        return dg.MaterializeResult(metadata=metadata, data_version=file_version(out))

    @dg.asset(
        group_name=GROUP,
        code_version=versions["bucketed"],
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
        table, recaptioned_version = read_parquet_versioned(layout.recaptioned(shard))
        start = time.perf_counter()
        result = bucket_shard(table, resolution, cfg.buckets)
        check_accounting(table["key"], result, bucket_stage(resolution))
        out, rejects = layout.bucketed(resolution, shard), layout.rejects(bucket_stage(resolution), shard)
        # Checked before anything is written: a failed blocking check still records the materialization,
        # and `sd3 data run` would then count the shard as done.
        violations = bucketed_violations(result.kept, resolution, cfg.buckets.multiple)
        if any(violations.values()):
            raise dg.Failure(description=f"bucket_invariants: shard {shard} at {resolution} px breaks them; nothing "
                                         "was written", metadata={name: dg.MetadataValue.json(keys[:20])
                                                                  for name, keys in violations.items() if keys})
        write_step(result, out, rejects, write_kept=write_bucketed)
        metadata = step_metadata(result, table.num_rows, time.perf_counter() - start, out)
        metadata["bucket_histogram"] = dg.MetadataValue.json(bucket_histogram(
            result.kept.select(["key", "height", "width"])))
        metadata["preview"] = thumbnails(result.kept)
        metadata.update(provenance({"recaptioned": recaptioned_version}, out, rejects))
        return dg.MaterializeResult(
            metadata=metadata,
            data_version=file_version(out),
            check_results=[dg.AssetCheckResult(check_name="bucket_invariants", passed=True)],
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
        present = [s for s in all_shards if layout.bucketed(resolution, s).exists()]
        records = latest_materializations(context.instance, "bucketed")
        shard_versions = {
            s: current_version(records.get(str(dg.MultiPartitionKey({"shard": s, "resolution": str(resolution)}))),
                               layout.bucketed(resolution, s))
            for s in present}
        index = with_dataset_version(build_index([layout.bucketed(resolution, s) for s in present]), shard_versions)
        repeated, repeated_keys = duplicate_keys(index)
        if repeated:  # before the write: the trainer must never read an index whose keys repeat
            raise dg.Failure(description=f"index_keys_unique: {repeated} rows at {resolution} px repeat a key; the "
                                         "index was not written", metadata={"duplicate_keys": dg.MetadataValue.json(repeated_keys)})
        write_parquet_atomic(index, layout.index(resolution))
        version, histogram = dataset_version(index), bucket_histogram(index)
        return dg.MaterializeResult(
            metadata={
                "rows": index.num_rows,
                "shards_indexed": len(present),
                "shards_missing": len(all_shards) - len(present),
                "buckets": len(histogram),
                "bucket_histogram": dg.MetadataValue.json(histogram),
                "dataset_version": version,
                "path": dg.MetadataValue.path(str(layout.index(resolution))),
            },
            data_version=dg.DataVersion(version),
            check_results=[dg.AssetCheckResult(check_name="index_keys_unique", passed=True,
                                               metadata={"duplicates": 0})],
        )

    return [url_shards, downloaded, content_hashes, filtered, recaptioned, bucketed, bucket_index]
