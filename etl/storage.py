"""Atomic parquet writes and reads that fail with a message naming the file."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq


class CorruptShardError(RuntimeError):
    pass


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder. A rename is durable only once its folder is fsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_umask() -> int:
    # Reading the umask means setting it: done once, at import, before any thread creates files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def created_mode(directory: bool = False) -> int:
    """The mode open() or mkdir() would give a new file or folder. tempfile makes them private (0600 and
    0700); outputs renamed into place from there get this instead, so the trainer or a server running as
    another user can read the data and the checkpoints."""
    return (0o777 if directory else 0o666) & ~_UMASK


# mkstemp(prefix=".<name>.", suffix=".tmp"): its random part has no dot, so the name ends at the last one.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]+\.tmp")
# Per folder, the temp files found at this process's first write there, by the file they were writing: a
# listing per write would make writing a stage's N shards into one folder cost N^2 entries read.
_LEFT_TEMP_FILES: dict[Path, dict[str, list[Path]]] = {}


def _remove_dead_temp_files(path: Path) -> None:
    """Remove the temp files of ``path`` that writers killed outright (SIGKILL, the OOM killer, a power loss)
    left before this process first wrote into its folder. A live writer holds a lock on its temp file, and
    the lock dies with it. Other files' temp files are not touched: their writers may be other partitions,
    running now, on a node whose locks this one may not see."""
    left = _LEFT_TEMP_FILES.get(path.parent)
    if left is None:
        left = {}
        with os.scandir(path.parent) as entries:
            for entry in entries:
                if (match := _TEMP_NAME.fullmatch(entry.name)):
                    left.setdefault(match["target"], []).append(Path(entry.path))
        _LEFT_TEMP_FILES[path.parent] = left
    for stale in left.pop(path.name, []):
        try:
            fd = os.open(stale, os.O_RDWR)  # NFS grants an exclusive lock only to a file open for writing
        except OSError:  # gone already, or not a file of ours to remove
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.unlink(missing_ok=True)
        except OSError:  # a live writer's lock, or a filesystem without flock: nothing tells a dead writer's
            pass
        finally:
            os.close(fd)


def _locked_temp_file(path: Path) -> tuple[int, str]:
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without flock (some Lustre mounts): no write sweeps a file there either
            return fd, tmp
        try:
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except FileNotFoundError:
            pass
        # Another write of ``path`` took it for a dead writer's in the moment before it was locked.
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """``write(file)`` into a temp file beside ``path``, fsync, rename, fsync the folder: readers see the
    old file or the new one, never a partial one, and the new file survives a power loss once this returns.
    A write that fails removes its temp file; one killed outright leaves it to the next process writing
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temp_files(path)
    fd, tmp = _locked_temp_file(path)
    try:
        os.fchmod(fd, created_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # before the file, and its lock, is closed: no one may take it for a dead one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


# Every page written with a CRC and checked on read: a flipped bit in an uncompressed image column would
# otherwise read back as a different image, silently. Files written elsewhere (img2dataset) carry none.
VERIFY = {"page_checksum_verification": True}


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, compression: str = "zstd",
                         row_group_size: int | None = None, uncompressed: tuple[str, ...] = (),
                         statistics: bool | tuple[str, ...] = True) -> Path:
    """``row_group_size`` bounds what a random read must decompress (the trainer reads single rows);
    ``uncompressed`` columns are stored as they are (encoded images gain nothing from zstd);
    ``statistics``: min/max for every column, none, or only the columns named."""
    codecs = {name: "none" if name in uncompressed else compression for name in table.column_names}
    stats = list(statistics) if isinstance(statistics, tuple) else statistics
    return write_atomic(path, lambda f: pq.write_table(table, f, compression=codecs, row_group_size=row_group_size,
                                                       write_statistics=stats, write_page_checksum=True))


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard not found: {path}")
    try:
        return pq.read_table(path, columns=columns, **VERIFY)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
        raise CorruptShardError(f"cannot read parquet file {path}: {err}") from err


def content_version(*paths: str | os.PathLike) -> str:
    """A short digest of the files' bytes: each stage's data version, and how it records the inputs it read."""
    digests = []
    for path in paths:
        with open(path, "rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").digest())
    return _short_digest(digests)


def _short_digest(file_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(file_digests)).hexdigest()[:16]


def read_parquet_versioned(path: str | os.PathLike) -> tuple[pa.Table, str]:
    """The table and the ``content_version`` of the very bytes it was read from: one open file, so a file
    replaced meanwhile (writes are renames) cannot pair one version's rows with another's digest."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard not found: {path}")
    with open(path, "rb") as f:
        digest = _short_digest([hashlib.file_digest(f, "sha256").digest()])
        f.seek(0)
        try:
            return pq.read_table(f, **VERIFY), digest
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as err:
            raise CorruptShardError(f"cannot read parquet file {path}: {err}") from err
