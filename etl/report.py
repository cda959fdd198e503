"""The whole dataset's books: where every input row ended up, per resolution."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from etl.buckets import bucket_stage
from etl.layout import DataLayout


@dataclass
class PipelineReport:
    input_rows: int
    kept: dict[int, int]  # resolution -> rows in its buckets
    rejects: dict[tuple[str, str], int]  # (stage, reason) -> rows
    unaccounted: dict[int, list[str]] = field(default_factory=dict)  # resolution -> keys (first few)
    double_counted: dict[int, list[str]] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return not any(self.unaccounted.values()) and not any(self.double_counted.values())

    def table(self) -> str:
        lines = [f"{'stage':<14} {'reason':<26} {'rows':>10}", "-" * 52]
        lines.append(f"{'input':<14} {'':<26} {self.input_rows:>10}")
        for (stage, reason), rows in sorted(self.rejects.items()):
            lines.append(f"{stage:<14} {reason:<26} {rows:>10}")
        for resolution, rows in sorted(self.kept.items()):
            lines.append(f"{'buckets':<14} {f'kept at {resolution}px':<26} {rows:>10}")
        lines.append("accounting: " + ("every input row is kept or rejected exactly once, at every resolution"
                                       if self.balanced else f"UNBALANCED unaccounted={self.unaccounted} "
                                                             f"double={self.double_counted}"))
        return "\n".join(lines)


def _keys(paths) -> pl.DataFrame:
    paths = [str(p) for p in paths]
    if not paths:
        return pl.DataFrame({"key": []}, schema={"key": pl.String})
    # One scan per file: sources with other extra columns give shards of other schemas.
    return pl.concat([pl.scan_parquet(path).select("key") for path in paths]).collect()


def pipeline_report(layout: DataLayout, resolutions: list[int]) -> PipelineReport:
    shards = layout.shards()
    inputs = _keys(layout.urls(s) for s in shards)["key"]
    # The stage is the rejects' folder (rejects/<stage>/<shard>.parquet): bucket rejects are per resolution
    # there (bucket_256, ...), and older bucket shards say only "bucket" in their stage column. Only the
    # current shards and resolutions count: a shard no source makes any more (another shard_size, a source
    # taken out) left the books with its URL rows, and a resolution taken out left with its buckets.
    dropped_resolutions = {folder.name for folder in (layout.root / "rejects").glob("bucket_*")} - {
        bucket_stage(r) for r in resolutions}
    stages = [(folder.name, [path for s in shards if (path := folder / f"{s}.parquet").exists()])
              for folder in sorted((layout.root / "rejects").glob("*"))
              if folder.is_dir() and folder.name not in dropped_resolutions]
    frames = [pl.scan_parquet([str(p) for p in files]).select("key", "reason").with_columns(stage=pl.lit(stage))
              for stage, files in stages if files]
    rejects = (
        pl.concat(frames).select("key", "stage", "reason").collect()
        if frames else pl.DataFrame(schema={"key": pl.String, "stage": pl.String, "reason": pl.String})
    )
    counts = rejects.group_by("stage", "reason").len()
    report = PipelineReport(
        input_rows=len(inputs),
        kept={},
        rejects={(r["stage"], r["reason"]): r["len"] for r in counts.iter_rows(named=True)},
    )
    for resolution in resolutions:
        kept = _keys(p for s in shards if (p := layout.bucketed(resolution, s)).exists())["key"]
        report.kept[resolution] = len(kept)
        # Rows rejected at another resolution's bucket stage still count as rejected only there.
        other_bucket_stages = [bucket_stage(r) for r in resolutions if r != resolution]
        rejected = rejects.filter(~pl.col("stage").is_in(other_bucket_stages))["key"]
        placed = pl.concat([kept, rejected])
        report.unaccounted[resolution] = inputs.filter(~inputs.is_in(placed)).head(5).to_list()
        report.double_counted[resolution] = placed.filter(placed.is_duplicated()).unique().head(5).to_list()
    return report
