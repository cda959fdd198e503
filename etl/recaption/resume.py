"""Finished recaption rows persisted in chunks, so a killed run resumes where it stopped, and kept after
the shard is done, so that no image is captioned twice by the same setup.

Each chunk is one parquet file written atomically (etl.storage), holding only the key, a fingerprint of
the row's input (image and alt text) and the outcome of each finished row; the images stay in the input
shard. A chunk is either fully there or absent, so a re-run after a SIGKILL loses at most the chunk in
progress and never duplicates a row. A finished row counts only while its key and fingerprint both
match the shard: keys are row positions in a source, so a rebuilt shard may give a key another image.
Rows whose key has left the shard (a stricter filter, a new duplicate elsewhere) are kept: they are
reused if it comes back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from etl.storage import read_parquet, write_parquet_atomic

log = logging.getLogger(__name__)

OUTCOMES = pa.schema(
    [
        ("key", pa.string()),
        ("input", pa.string()),  # input_fingerprint of the row captioned
        ("recaption", pa.string()),
        ("recaption_short", pa.string()),
        ("reason", pa.string()),  # null when the row was captioned
        ("detail", pa.string()),
    ]
)

MANIFEST = "manifest.json"
# Part of the manifest: chunks written with another OUTCOMES schema are discarded, not misread.
CHUNK_FORMAT = 2


def input_fingerprints(table: pa.Table) -> list[str]:
    """Per row, a hash of the image bytes and the alt text: what a caption was made from."""
    fingerprints = []
    for batch in table.select(["image", "caption"]).to_batches(max_chunksize=256):  # not all images at once
        for image, caption in zip(batch.column("image").to_pylist(), batch.column("caption").to_pylist()):
            digest = hashlib.blake2b(image or b"", digest_size=16)
            digest.update(b"\0" + (caption or "").encode())
            fingerprints.append(digest.hexdigest())
    return fingerprints


class WorkDirBusy(RuntimeError):
    """Another process is recaptioning the same shard."""


@contextlib.contextmanager
def claimed(work_dir: Path) -> Iterator[None]:
    """Hold ``work_dir`` for this process: two runs of one shard (a scheduled run and `sd3 data run`, say)
    would number their chunks alike and delete each other's files. The lock dies with the process."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise WorkDirBusy(f"recaption: {work_dir} is in use by another run of this shard; "
                              "let it finish (its captions are kept) and run again") from err
        yield


class ResumeChunks:
    """The chunk files in ``work_dir``; chunks made under another captioning setup are discarded."""

    def __init__(self, work_dir: str | os.PathLike, setup: dict):
        setup = {**setup, "chunk_format": CHUNK_FORMAT}
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
        paths = self.paths()
        index = int(paths[-1].stem.removeprefix("chunk-")) + 1 if paths else 0
        return write_parquet_atomic(outcomes.cast(OUTCOMES), self.work_dir / f"chunk-{index:06d}.parquet")

    def compact(self, outcomes: pa.Table) -> None:
        """Replace every chunk by one holding ``outcomes``. The new chunk is in place before an old one
        goes: a crash in between leaves rows twice, with the same outcome, never none."""
        older = self.paths()
        self.append(outcomes)
        for path in older:
            path.unlink()

    @staticmethod
    def _write_manifest(path: Path, setup: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(setup, f, sort_keys=True)
        os.replace(tmp, path)
