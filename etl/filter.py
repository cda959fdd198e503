"""The filter stage: metadata thresholds, exact-duplicate removal across the whole dataset, decodability
and minimum size.

Dedup is two-pass so it is right whatever order shards are filtered in: ``hash_candidates`` per shard,
``duplicate_winners`` over all of them (one winning key per content hash), then ``filter_shard`` per shard.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from etl.config import FilterConfig
from etl.images import ImageRejected, decode, open_image, oriented_size
from etl.recaption.postprocess import clean_alt_text
from etl.schema import StepResult, make_rejects

STAGE = "filter"
WINNERS = pa.schema([("sha256", pa.string()), ("key", pa.string())])
# What ``hash_candidates`` reads of a downloaded shard: a few bytes a row, where the images are ~100 KB.
HASH_CANDIDATE_COLUMNS = ["key", "sha256", "caption", "punsafe", "pwatermark"]
# Decode JPEGs at a reduced DCT scale, no smaller than this: every byte is still decoded.
_DRAFT_SIZE = (64, 64)


def _threshold_reasons(table: pa.Table, cfg: FilterConfig) -> list[tuple[str, pa.Array, float]]:
    """(reason, column, limit) for each enabled metadata threshold. A NaN score is unknown, as a null is:
    lists written by Spark, polars or numpy carry NaN where LAION's have nulls."""
    checks = []
    for reason, limit in (("punsafe", cfg.max_punsafe), ("pwatermark", cfg.max_pwatermark)):
        if limit is not None and reason in table.column_names:
            column = table[reason]
            checks.append((reason, pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column), limit))
    return checks


def _passes_thresholds(table: pa.Table, cfg: FilterConfig) -> pa.Array:
    keep = pa.array(np.ones(table.num_rows, dtype=bool))
    for _reason, column, limit in _threshold_reasons(table, cfg):
        keep = pc.and_(keep, pc.fill_null(pc.less_equal(column, limit), True))  # unknown scores pass
    return keep


def hash_candidates(downloaded: pa.Table, cfg: FilterConfig) -> pa.Table:
    """(key, sha256, captioned) of the rows that pass the metadata thresholds and have a content hash;
    ``captioned``: the alt text is not empty once cleaned.

    ``downloaded`` needs only the ``HASH_CANDIDATE_COLUMNS``."""
    keep = pc.and_(_passes_thresholds(downloaded, cfg), pc.is_valid(downloaded["sha256"]))
    rows = downloaded.select(["key", "sha256", "caption"]).filter(keep)
    captions = rows["caption"]
    # Vectorised for the usual plain text; only captions with markup go through clean_alt_text in Python
    # (this runs over every row of the dataset at each pipeline run).
    captioned = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0), False)
    markup = pc.fill_null(pc.match_substring_regex(captions, "[<&]"), False)
    if pc.any(markup).as_py():
        marked = pc.indices_nonzero(markup).to_pylist()
        flags = captioned.to_numpy(zero_copy_only=False).copy()
        flags[marked] = [bool(clean_alt_text(text)) for text in captions.take(marked).to_pylist()]
        captioned = pa.array(flags)
    return rows.select(["key", "sha256"]).append_column("captioned", captioned)


def duplicate_winners(candidates: Iterable[pa.Table]) -> pa.Table:
    """One row per sha256 over all shards: the copy that is kept. A copy with an alt text wins over one
    without (the alt text is the caption, or the VLM's hint), then the smallest key."""
    frames = [pl.from_arrow(table.select(["key", "sha256", "captioned"])) for table in candidates]
    if not frames:
        return WINNERS.empty_table()
    winners = (pl.concat(frames).sort("captioned", "key", descending=[True, False])
               .group_by("sha256", maintain_order=True).agg(pl.col("key").first()).sort("sha256"))
    return winners.to_arrow().select(WINNERS.names).cast(WINNERS)


def _metadata_reasons(table: pa.Table, cfg: FilterConfig) -> tuple[list[str | None], list[str | None]]:
    reasons: list[str | None] = [None] * table.num_rows
    details: list[str | None] = [None] * table.num_rows
    for reason, column, limit in _threshold_reasons(table, cfg):
        for i, value in enumerate(column.to_pylist()):
            if reasons[i] is None and value is not None and value > limit:
                reasons[i], details[i] = reason, f"{reason} {value} > {limit}"
    return reasons, details


def _duplicate_of(table: pa.Table, winners: pa.Table) -> list[str | None]:
    """For each row, the winning key when the row is a copy of another row's bytes, else None."""
    rows = pl.from_arrow(table.select(["key", "sha256"])).with_row_index("row")
    joined = rows.join(pl.from_arrow(winners), on="sha256", how="left", suffix="_winner").sort("row")
    return [
        winner if winner is not None and winner != key else None
        for key, winner in zip(joined["key"].to_list(), joined["key_winner"].to_list())
    ]


def dedup_version(hashes: pa.Table, winners: pa.Table | None, cfg: FilterConfig) -> str:
    """A digest of the duplicate decisions ``filter_shard`` takes for these rows (``hashes``: key, sha256).

    It names only the winners this shard's images meet, so the winners of a newly downloaded shard do
    not make every other shard's filter output stale."""
    if not cfg.dedup or winners is None:
        return "off"
    decisions = "\n".join(winner or "" for winner in _duplicate_of(hashes, winners))
    return hashlib.sha256(decisions.encode()).hexdigest()[:16]


def filter_shard(downloaded: pa.Table, winners: pa.Table | None, cfg: FilterConfig) -> StepResult:
    """Keep the usable rows (width/height set to the displayed size) and reject the rest with a reason."""
    reasons, details = _metadata_reasons(downloaded, cfg)
    if cfg.dedup and winners is not None:
        for i, winner in enumerate(_duplicate_of(downloaded, winners)):
            if reasons[i] is None and winner is not None:
                reasons[i], details[i] = "duplicate", f"same bytes as {winner}"

    widths = downloaded["width"].to_pylist()
    heights = downloaded["height"].to_pylist()
    for i, (reason, data) in enumerate(zip(reasons, downloaded["image"])):
        if reason is not None:
            continue
        try:
            img = open_image(data.as_py() or b"")
            widths[i], heights[i] = oriented_size(img)
            if min(widths[i], heights[i]) < cfg.min_side:  # checked first: no need to decode it
                reasons[i] = "too_small"
                details[i] = f"{widths[i]}x{heights[i]} (w x h) has a side under min_side {cfg.min_side}"
                continue
            decode(img, at_least=_DRAFT_SIZE)
        except ImageRejected as err:
            reasons[i], details[i] = err.reason, err.detail

    sized = downloaded
    for name, values in (("width", widths), ("height", heights)):
        index = sized.schema.get_field_index(name)
        sized = sized.set_column(index, sized.schema.field(index), pa.array(values, pa.int32()))
    rejected = [i for i, reason in enumerate(reasons) if reason is not None]
    rejected_rows = pa.array(rejected, pa.int64())
    rejects = make_rejects(
        downloaded["key"].take(rejected_rows).to_pylist(),
        downloaded["url"].take(rejected_rows).to_pylist(),
        STAGE,
        [reasons[i] for i in rejected],
        [details[i] for i in rejected],
    )
    keep = pa.array([reason is None for reason in reasons], pa.bool_())
    return StepResult(kept=sized.filter(keep), rejects=rejects)
