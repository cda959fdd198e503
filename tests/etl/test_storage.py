import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etl import storage


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "table.bin"
    storage.write_atomic(target, lambda f: f.write(b"old"))

    def fail_halfway(f):
        f.write(b"new, half wr")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_atomic(target, fail_halfway)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.bin"]


_HANGING_WRITER = """
import sys, time
from etl.storage import write_atomic

def write(f):
    f.write(b"half wr")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

write_atomic(sys.argv[1], write)
"""


def hanging_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """A process in the middle of write_atomic(target), and its temp file."""
    before = set(target.parent.iterdir())
    writer = subprocess.Popen([sys.executable, "-c", _HANGING_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert writer.stdout.readline() == "writing\n"
    (temp_file,) = set(target.parent.iterdir()) - before
    return writer, temp_file


def test_a_write_removes_the_temp_files_of_killed_writes_of_the_same_file_only(tmp_path):
    target = tmp_path / "table.parquet"
    killed = {}
    # Another file's writers may be other partitions, running now; "table.parquet.old" begins like target.
    for name in ("table.parquet", "other.parquet", "table.parquet.old"):
        writer, killed[name] = hanging_writer(tmp_path / name)
        writer.kill()
        writer.wait()
    live, live_temp_file = hanging_writer(target)
    try:
        storage.write_atomic(target, lambda f: f.write(b"new"))
        assert target.read_bytes() == b"new"
        assert not killed["table.parquet"].exists()
        assert killed["other.parquet"].exists() and killed["table.parquet.old"].exists()
        assert live_temp_file.exists()  # a write of the same file going on now
    finally:
        live.kill()
        live.wait()


def test_a_filesystem_without_flock_still_writes_and_leaves_temp_files_alone(tmp_path, monkeypatch):
    def no_flock(fd, operation):  # what flock gives on a Lustre mount without the flock option
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(storage.fcntl, "flock", no_flock)
    stale = tmp_path / ".table.parquet.abc123.tmp"
    stale.write_bytes(b"half")
    storage.write_atomic(tmp_path / "table.parquet", lambda f: f.write(b"whole"))
    assert (tmp_path / "table.parquet").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "table.parquet"]  # no lock tells it is dead


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), (tmp_path / "a.bin").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage.write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert synced[-1] == (tmp_path, True)


def test_written_files_and_checkpoint_folders_get_the_mode_open_would_give(tmp_path):
    # tempfile's private 0600 / 0700 would lock out a trainer or server running as another user.
    from trainer.checkpoint import atomic_step_folder

    umask = storage._UMASK
    storage.write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    with open(tmp_path / "plain.bin", "wb"):
        pass
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_step_folder(tmp_path / "run" / "step_0000001") as folder:
        (folder / "weights").write_bytes(b"w")
    assert (tmp_path / "run" / "step_0000001").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_flipped_bit_in_an_uncompressed_image_column_is_caught_on_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Over 4 KiB, as images are: no min/max statistics copy of the bytes goes into the footer.
    table = pa.table({"key": ["a", "b"], "image": [os.urandom(8000), os.urandom(8000)]})
    path = storage.write_parquet_atomic(table, tmp_path / "shard.parquet", uncompressed=("image",))
    data = bytearray(path.read_bytes())
    data[data.index(table["image"][1].as_py()[:64]) + 100] ^= 0x10  # inside the stored bytes of image "b"
    path.write_bytes(bytes(data))
    assert not pq.read_table(path)["image"].equals(table["image"])  # unchecked, it reads back as other bytes
    with pytest.raises(storage.CorruptShardError, match="CRC checksum verification failed"):
        storage.read_parquet(path)
    with pytest.raises(storage.CorruptShardError, match="CRC"):
        storage.read_parquet_versioned(path)
