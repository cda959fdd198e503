"""The tables every stage reads and writes, and the result type each stage returns.

Every stage is a function over a shard table that returns a ``StepResult``: the rows it kept and the
rows it rejected, each rejection with a reason. Together they account for every input row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

# Numeric metadata that LAION-style lists may carry; kept typed when present, null otherwise.
OPTIONAL_FLOAT_COLUMNS = ("punsafe", "pwatermark", "similarity")

URLS = pa.schema(
    [
        ("key", pa.string()),  # "<source>-<row in the source list, 9 digits>", unique across sources
        ("url", pa.string()),
        ("caption", pa.string()),  # alt text
        ("source", pa.string()),
        *[(name, pa.float64()) for name in OPTIONAL_FLOAT_COLUMNS],
    ]
)

CANONICAL = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),  # encoded bytes; decode lazily
        ("width", pa.int32()),  # of the stored image
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("source", pa.string()),
        ("sha256", pa.string()),  # content hash of the original downloaded bytes
        *[(name, pa.float64()) for name in OPTIONAL_FLOAT_COLUMNS],
        ("recaption", pa.string()),
        ("recaption_short", pa.string()),
    ]
)

REJECTS = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # a short machine-readable word, e.g. "http_404", "too_small"
        ("detail", pa.string()),  # the human-readable message behind the reason
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Order and cast ``table`` to ``schema``, adding missing columns as nulls; extra columns are kept after."""
    columns, fields = [], []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
        fields.append(field)
    for name in table.column_names:
        if name not in schema.names:
            columns.append(table[name])
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def make_rejects(keys, urls, stage: str, reasons, details=None) -> pa.Table:
    keys, urls, reasons = list(keys), list(urls), list(reasons)
    details = list(details) if details is not None else [None] * len(keys)
    return pa.table(
        {"key": keys, "url": urls, "stage": [stage] * len(keys), "reason": reasons, "detail": details},
        schema=REJECTS,
    )


def empty_rejects() -> pa.Table:
    return REJECTS.empty_table()


@dataclass
class StepResult:
    """What a stage kept and what it rejected (with reasons); ``counts`` sums to the rows it was given."""

    kept: pa.Table
    rejects: pa.Table

    @property
    def counts(self) -> dict[str, int]:
        counts = {"kept": self.kept.num_rows}
        counts.update(sorted(Counter(self.rejects["reason"].to_pylist()).items()))
        return counts
