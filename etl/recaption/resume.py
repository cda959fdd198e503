"""Finished recaption rows persisted in chunks, so a killed run resumes where it stopped.

Each chunk is one parquet file written atomically (etl.storage), holding only the key and the outcome of
each finished row; the images stay in the input shard. A chunk is either fully there or absent, so a
re-run after a SIGKILL loses at most the chunk in progress and never duplicates a row.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa

from etl.storage import read_parquet, write_parquet_atomic

log = logging.getLogger(__name__)

OUTCOMES = pa.schema(
    [
        ("key", pa.string()),
        ("recaption", pa.string()),
        ("recaption_short", pa.string()),
        ("reason", pa.string()),  # null when the row was captioned
        ("detail", pa.string()),
    ]
)

MANIFEST = "manifest.json"


class ResumeChunks:
    """The chunk files in ``work_dir``; chunks made under another captioning setup are discarded."""

    def __init__(self, work_dir: str | os.PathLike, setup: dict):
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.work_dir / MANIFEST
        if manifest.exists() and json.loads(manifest.read_text()) != setup:
            log.warning("recaption setup changed since %s was written: discarding its chunks", self.work_dir)
            for path in self.paths():
                path.unlink()
        self._write_manifest(manifest, setup)
        # Half-written temp files of a killed run; their rows were never counted as finished.
        for stale in self.work_dir.glob(".*.tmp"):
            stale.unlink()

    def paths(self) -> list[Path]:
        return sorted(self.work_dir.glob("chunk-*.parquet"))

    def finished(self) -> pa.Table:
        tables = [read_parquet(path).cast(OUTCOMES) for path in self.paths()]
        return pa.concat_tables(tables) if tables else OUTCOMES.empty_table()

    def append(self, outcomes: pa.Table) -> Path:
        index = len(self.paths())
        return write_parquet_atomic(outcomes.cast(OUTCOMES), self.work_dir / f"chunk-{index:06d}.parquet")

    @staticmethod
    def _write_manifest(path: Path, setup: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(setup, f, sort_keys=True)
        os.replace(tmp, path)
