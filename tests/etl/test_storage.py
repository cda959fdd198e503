import os
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


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append((Path(os.readlink(f"/proc/self/fd/{fd}")), (tmp_path / "a.bin").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    storage.write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    assert synced[-1] == (tmp_path, True)
