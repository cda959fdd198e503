"""Keeping the books: every input row is kept or rejected with a reason, exactly once."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from etl.schema import REJECTS, StepResult, make_rejects


class AccountingError(RuntimeError):
    pass


def check_accounting(input_keys, result: StepResult, stage: str) -> None:
    """Raise when a stage lost, invented or double-counted a row (``input_keys``: a list or Arrow array)."""
    given = input_keys if isinstance(input_keys, list) else input_keys.to_pylist()
    kept = result.kept["key"].to_pylist()
    rejected = result.rejects["key"].to_pylist()
    out = kept + rejected
    if len(out) != len(given) or set(out) != set(given) or len(set(out)) != len(out):
        missing = sorted(set(given) - set(out))[:5]
        extra = sorted(set(out) - set(given))[:5]
        raise AccountingError(
            f"stage {stage} broke the accounting: {len(given)} rows in, {len(kept)} kept + {len(rejected)} rejected;"
            f" missing {missing}, unexpected {extra}"
        )


def reject_where(result: StepResult, mask: list[bool], stage: str, reason: str, detail: str) -> StepResult:
    """Move the kept rows selected by ``mask`` to the rejects."""
    mask_array = pa.array(mask, type=pa.bool_())
    moved = result.kept.filter(mask_array)
    rejects = make_rejects(moved["key"].to_pylist(), moved["url"].to_pylist(), stage, [reason] * moved.num_rows,
                           [detail] * moved.num_rows)
    return StepResult(
        kept=result.kept.filter(pc.invert(mask_array)),
        rejects=pa.concat_tables([result.rejects.cast(REJECTS), rejects]),
    )
