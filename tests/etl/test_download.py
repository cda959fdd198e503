"""download_shard through the real img2dataset against a loopback server that misbehaves on purpose."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from etl.config import DownloadConfig
from etl.download import (_IMG2DATASET_CHILD, download_shard, identify_image, img2dataset_shards,
                          img2dataset_url_rows, import_img2dataset_shard, reason_for, run_img2dataset,
                          settled_outcomes)
from etl.schema import CANONICAL, REJECTS, StepResult
from tests.etl.fault_server import VALID_JPEG, VALID_JPEG_SIZE, VALID_PNG, VALID_PNG_SIZE, FaultServer
from tests.processes import command_line, descendants

TIMEOUT = 1
# route -> expected outcome: ("kept", original bytes, (width, height)) or ("rejected", reason)
ROUTES = {
    "/404": ("rejected", "http_404"),
    "/500": ("rejected", "http_500"),
    "/slow": ("rejected", "timeout"),
    "/redirect": ("kept", VALID_PNG, VALID_PNG_SIZE),
    "/valid.png": ("kept", VALID_PNG, VALID_PNG_SIZE),
    "/valid.jpg": ("kept", VALID_JPEG, VALID_JPEG_SIZE),
    "/png-as-text": ("kept", VALID_PNG, VALID_PNG_SIZE),
    "/html-as-jpeg": ("rejected", "decode_error"),
    "/empty": ("rejected", "empty_body"),
    "/random": ("rejected", "decode_error"),
    "/flaky": ("kept", VALID_PNG, VALID_PNG_SIZE),  # its 503 is tried again in the second pass
}
NOT_SENT = {"ftp://example.com/a.png": "invalid_url", "": "invalid_url", None: "invalid_url"}


def url_table(server: FaultServer) -> pa.Table:
    urls = [server.url(route) for route in ROUTES] + list(NOT_SENT)
    n = len(urls)
    return pa.table(
        {
            "key": [f"test-{i:09d}" for i in range(n)],
            "url": urls,
            "caption": [f"caption {i}" for i in range(n)],
            "source": ["test"] * n,
            "punsafe": [i / 100 for i in range(n)],
            "pwatermark": [None] * n,
            "similarity": [0.3] * n,
        }
    )


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("work")
    with FaultServer(slow_seconds=TIMEOUT + 2) as server:
        urls = url_table(server)
        result = download_shard(urls, work_dir, DownloadConfig(processes=1, threads=4, timeout=TIMEOUT))
    return urls, result, work_dir


def test_every_row_is_accounted_for_once(downloaded):
    urls, result, _ = downloaded
    out = result.kept["key"].to_pylist() + result.rejects["key"].to_pylist()
    assert sorted(out) == sorted(urls["key"].to_pylist())
    assert sum(result.counts.values()) == urls.num_rows


def test_each_fault_gets_its_reason(downloaded):
    urls, result, _ = downloaded
    reasons = dict(zip(result.rejects["url"].to_pylist(), result.rejects["reason"].to_pylist()))
    for route, expected in ROUTES.items():
        url = [u for u in urls["url"].to_pylist() if u and u.endswith(route)][0]
        if expected[0] == "rejected":
            assert reasons.get(url) == expected[1], route
    for url, reason in NOT_SENT.items():
        assert reasons[url] == reason
    assert result.rejects.schema == REJECTS
    assert set(result.rejects["stage"].to_pylist()) == {"download"}
    details = dict(zip(result.rejects["reason"].to_pylist(), result.rejects["detail"].to_pylist()))
    assert "404" in details["http_404"]


def test_transient_failures_get_a_second_pass_that_their_rejects_record(downloaded, tmp_path):
    _, result, _ = downloaded
    details = dict(zip(result.rejects["reason"].to_pylist(), result.rejects["detail"].to_pylist()))
    assert details["timeout"].endswith("(pass 2 of 2)")
    assert "pass" not in details["http_404"]  # final at once: not tried again
    with FaultServer() as server:
        urls = pa.table({"key": ["a", "b"], "url": [server.url("/flaky"), server.url("/404")]})
        once = download_shard(urls, tmp_path, DownloadConfig(processes=1, threads=2, timeout=TIMEOUT, transient_passes=0))
    assert once.kept.num_rows == 0
    assert dict(zip(once.rejects["key"].to_pylist(), once.rejects["reason"].to_pylist())) == {
        "a": "http_503", "b": "http_404"}


def test_downloading_again_fetches_only_what_the_last_download_did_not_settle(tmp_path):
    cfg = DownloadConfig(processes=1, threads=2, timeout=TIMEOUT, transient_passes=0)
    with FaultServer() as server:
        urls = pa.table({"key": ["a", "b", "c", "d"],
                         "url": [server.url("/valid.png"), server.url("/404"), server.url("/flaky"), "ftp://x/y.png"]})
        first = download_shard(urls, tmp_path, cfg)
        assert first.kept["key"].to_pylist() == ["a"]  # /flaky's 503 is a reject of this run
        again = download_shard(urls, tmp_path, cfg, settled_outcomes(urls, first))
        # A changed URL is a new row to fetch, whatever its key had before.
        moved = urls.set_column(1, "url", pa.array([server.url("/valid.jpg"), *urls["url"].to_pylist()[1:]]))
        settled_moved = settled_outcomes(moved, again)
        requests = dict(server.requests)
    assert requests == {"/valid.png": 1, "/404": 1, "/flaky": 2}
    assert again.kept["key"].to_pylist() == ["a", "c"]
    assert again.kept.slice(0, 1).equals(first.kept)  # reused as it was
    assert again.rejects.equals(first.rejects.filter(pc.is_in(first.rejects["key"], pa.array(["b", "d"]))))
    assert sorted(settled_moved) == [1, 2]  # b's 404 and c's image stand; a moved; d is never fetched


def test_valid_images_keep_original_bytes_sizes_and_hash(downloaded):
    _, result, _ = downloaded
    assert result.kept.schema == CANONICAL
    kept = {row["url"].rsplit("/", 1)[1]: row for row in result.kept.to_pylist()}
    assert set(kept) == {route[1:] for route, expected in ROUTES.items() if expected[0] == "kept"}
    for route, expected in ROUTES.items():
        if expected[0] != "kept":
            continue
        row = kept[route[1:]]
        _, data, (width, height) = expected
        assert row["image"] == data
        assert (row["width"], row["height"]) == (width, height)
        assert (row["original_width"], row["original_height"]) == (width, height)
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["recaption"] is None and row["recaption_short"] is None


def test_input_columns_are_carried_to_kept_rows(downloaded):
    urls, result, _ = downloaded
    by_key = {row["key"]: row for row in urls.to_pylist()}
    for row in result.kept.to_pylist():
        source_row = by_key[row["key"]]
        for name in ("url", "caption", "source", "punsafe", "pwatermark", "similarity"):
            assert row[name] == source_row[name], name


def test_work_dir_is_cleaned(downloaded):
    _, _, work_dir = downloaded
    assert [p.name for p in Path(work_dir).iterdir()] == ["lock"]


_DOWNLOAD = """
import sys
from pathlib import Path
import pyarrow as pa
from etl.config import DownloadConfig
from etl.download import download_shard

download_shard(pa.table({"key": ["hangs"], "url": [sys.argv[2]]}), Path(sys.argv[1]),
               DownloadConfig(processes=1, threads=1, timeout=600))
"""


def processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # gone meanwhile
        found.append((int(stat.parent.name), state, int(parent), int(group)))
    return found


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)
    return value


def test_a_download_killed_outright_stops_its_img2dataset_and_the_next_removes_its_folder(tmp_path):
    work_dir = tmp_path / "work"
    cfg = DownloadConfig(processes=1, threads=1, timeout=TIMEOUT)
    group = None
    with FaultServer(slow_seconds=600) as server:  # /slow never answers while the test lasts
        caller = subprocess.Popen([sys.executable, "-c", _DOWNLOAD, str(work_dir), server.url("/slow")],
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        try:
            wait_for(lambda: server.requests["/slow"], 120, "img2dataset fetching /slow")
            (group,) = {pid for pid, _, parent, _ in processes() if parent == caller.pid}  # a group leader
            killed_folder = next(work_dir.glob("img2dataset-*"))
            # A download of the same shard while that one is live (another run) leaves its folder alone.
            live = download_shard(pa.table({"key": ["a"], "url": [server.url("/valid.png")]}), work_dir, cfg)
            assert live.kept["key"].to_pylist() == ["a"]
            assert list(work_dir.glob("img2dataset-*")) == [killed_folder]

            caller.kill()
            caller.wait()
            # Its zombies wait for whatever reaps orphans here: dead all the same.
            wait_for(lambda: not [pid for pid, state, _, pg in processes() if pg == group and state not in "ZX"],
                     60, "img2dataset stopping with its caller")
            again = download_shard(pa.table({"key": ["b"], "url": [server.url("/valid.jpg")]}), work_dir, cfg)
            assert again.kept["key"].to_pylist() == ["b"]
            assert list(work_dir.glob("img2dataset-*")) == []
        finally:
            caller.kill()
            caller.wait()
            if group is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)


def test_no_process_of_a_download_loads_torch(tmp_path):
    """img2dataset's processes hide torch from webdataset (etl/img2dataset_child.py), which starts each of
    them about 2 s sooner; looked at while img2dataset's worker, its imports done, waits on /slow."""
    cfg = DownloadConfig(processes=1, threads=1, timeout=5)
    with FaultServer(slow_seconds=8) as server:
        download = threading.Thread(target=download_shard,
                                    args=(pa.table({"key": ["a"], "url": [server.url("/slow")]}), tmp_path, cfg))
        download.start()
        try:
            wait_for(lambda: server.requests["/slow"], 120, "img2dataset fetching /slow")
            # Only the download's own tree: the suite's background demo training (tests/demo_training.py)
            # is below pytest too, and its ranks load torch.
            children = descendants(os.getpid())
            img2dataset = [pid for pid in children if "img2dataset_child.py" in command_line(pid)]
            maps = {}
            for pid in img2dataset + [pid for root in img2dataset for pid in descendants(root)]:
                with contextlib.suppress(FileNotFoundError):
                    maps[pid] = Path(f"/proc/{pid}/maps").read_text()
        finally:
            download.join()
    assert len(img2dataset) == 1, children
    assert len(maps) >= 3, maps.keys()  # img2dataset's interpreter, its logger and its worker at least
    assert not [pid for pid, text in maps.items() if "libtorch" in text]


# What each spawned process of img2dataset does first: run the child's top (not its __main__ part), then
# import img2dataset. Then two of the stood-in modules are used.
STAND_INS = """
import runpy, sys
runpy.run_path(sys.argv[1])
import img2dataset
print(*(type(sys.modules[name]).__name__ for name in ("wandb", "albumentations", "pandas")))
from img2dataset import reader, resizer
print(reader.pd.DataFrame({"a": [1, 2]}).shape, resizer.A.LongestMaxSize.__name__, type(sys.modules["pandas"]).__name__)
"""


def test_modules_img2dataset_imports_for_options_a_download_never_sets_load_only_on_use():
    result = subprocess.run([sys.executable, "-P", "-c", STAND_INS, str(_IMG2DATASET_CHILD)], capture_output=True,
                            text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ImportedOnUse ImportedOnUse ImportedOnUse",
                                          "(2, 1) LongestMaxSize module"]


def test_second_call_off_the_main_thread_reencodes_and_leaves_no_global_state(tmp_path):
    """img2dataset sets a SIGINT handler (main thread only) and starts processes: none of it may leak."""
    handler_before = signal.getsignal(signal.SIGINT)
    outcome = {}
    with FaultServer() as server:
        urls = pa.table(
            {
                "key": ["a", "b", "c"],
                "url": [server.url("/valid.png"), server.url("/random"), server.url("/empty")],
            }
        )
        cfg = DownloadConfig(processes=1, threads=2, timeout=TIMEOUT, encode_format="webp")

        def run():
            outcome["result"] = download_shard(urls, tmp_path, cfg)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert signal.getsignal(signal.SIGINT) is handler_before
    result = outcome["result"]
    assert result.kept["key"].to_pylist() == ["a"]
    row = result.kept.to_pylist()[0]
    with Image.open(io.BytesIO(row["image"])) as image:
        assert image.format == "WEBP"
        assert image.size == VALID_PNG_SIZE == (row["width"], row["height"])
    assert row["sha256"] == hashlib.sha256(VALID_PNG).hexdigest()  # the hash is of the downloaded bytes
    assert dict(zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist())) == {
        "b": "decode_error",
        "c": "empty_body",
    }


def test_rows_without_a_fetchable_url_never_reach_img2dataset(tmp_path):
    urls = pa.table({"key": ["x", "y"], "url": ["not a url", "file:///etc/passwd"]})
    result = download_shard(urls, tmp_path / "work", DownloadConfig())
    assert result.kept.num_rows == 0 and result.kept.schema == CANONICAL
    assert result.rejects["reason"].to_pylist() == ["invalid_url", "invalid_url"]
    assert not (tmp_path / "work").exists()


def test_empty_shard_and_bad_tables():
    empty = pa.table({"key": pa.array([], pa.string()), "url": pa.array([], pa.string())})
    result = download_shard(empty, Path("."), DownloadConfig())
    assert result.counts == {"kept": 0}
    with pytest.raises(ValueError, match="unique"):
        download_shard(pa.table({"key": ["a", "a"], "url": ["http://x/1", "http://x/2"]}), Path("."), DownloadConfig())
    with pytest.raises(ValueError, match="'url'"):
        download_shard(pa.table({"key": ["a"]}), Path("."), DownloadConfig())


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 403: Forbidden", "http_403"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("unknown url type: 'htp'", "invalid_url"),
        ("<urlopen error [Errno -2] Name or service not known>", "connection_error"),
        ("Remote end closed connection without response", "connection_error"),
        ("Use of image disallowed by X-Robots-Tag directive", "robots_disallowed"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_reason_for_urllib_messages(message, reason):
    assert reason_for(message) == reason


# --- already-downloaded img2dataset output ----------------------------------------------------


def import_folder(folder, source: str) -> StepResult:
    """Every shard file of an img2dataset output folder, as the pipeline's download stage imports them."""
    results = [import_img2dataset_shard(path, source) for path in img2dataset_shards(folder)]
    for path, result in zip(img2dataset_shards(folder), results):  # the URL rows url_shards writes, images unread
        rows = img2dataset_url_rows(path, source)["key"].to_pylist()
        assert sorted(rows) == sorted(result.kept["key"].to_pylist() + result.rejects["key"].to_pylist())
    return StepResult(kept=pa.concat_tables([r.kept for r in results]),
                      rejects=pa.concat_tables([r.rejects for r in results]))


@pytest.mark.parametrize("output_format", ["parquet", "webdataset"])
def test_import_real_img2dataset_output(tmp_path, output_format):
    with FaultServer() as server:
        routes = ["/404", "/valid.png", "/valid.jpg", "/random", "/empty"]
        pq.write_table(
            pa.table(
                {
                    "url": [server.url(r) for r in routes],
                    "text": [f"alt {r}" for r in routes],
                    "punsafe": [0.1, 0.2, 0.3, 0.4, 0.5],
                }
            ),
            tmp_path / "list.parquet",
        )
        run_img2dataset(
            {
                "url_list": str(tmp_path / "list.parquet"),
                "output_folder": str(tmp_path / "laion"),
                "input_format": "parquet",
                "output_format": output_format,
                "caption_col": "text",
                "save_additional_columns": ["punsafe"],
                "image_size": 32,  # img2dataset's own resize (border mode) before we import
                "number_sample_per_shard": 3,
                "processes_count": 1,
                "thread_count": 2,
                "timeout": TIMEOUT,
            }
        )
    result = import_folder(tmp_path / "laion", "laion")
    assert result.counts == {"kept": 2, "decode_error": 1, "empty_body": 1, "http_404": 1}
    assert result.kept.schema == CANONICAL
    kept = {row["caption"]: row for row in result.kept.to_pylist()}
    assert set(kept) == {"alt /valid.png", "alt /valid.jpg"}
    png = kept["alt /valid.png"]
    assert (png["width"], png["height"]) == (32, 32)
    assert (png["original_width"], png["original_height"]) == VALID_PNG_SIZE
    assert png["sha256"] == hashlib.sha256(VALID_PNG).hexdigest()
    assert png["punsafe"] == 0.2 and png["source"] == "laion" and png["key"].startswith("laion-")
    with Image.open(io.BytesIO(png["image"])) as image:
        assert image.size == (32, 32)
    keys = result.kept["key"].to_pylist() + result.rejects["key"].to_pylist()
    assert len(set(keys)) == 5


def test_import_plain_webdataset_tar(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    members = {
        "a/000.png": VALID_PNG,
        "a/000.txt": b"a red box",
        "a/000.json": json.dumps({"url": "http://x/0.png", "similarity": 0.31}).encode(),
        "a/001.jpg": b"<html>nope</html>",
        "a/002.txt": b"caption without image",
    }
    with tarfile.open(folder / "shard-0.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = import_folder(folder, "web")
    [row] = result.kept.to_pylist()
    assert row["key"] == "web-shard-0-a/000" and row["caption"] == "a red box" and row["url"] == "http://x/0.png"
    assert row["image"] == VALID_PNG and (row["width"], row["height"]) == VALID_PNG_SIZE
    assert row["similarity"] == 0.31
    assert dict(zip(result.rejects["key"].to_pylist(), result.rejects["reason"].to_pylist())) == {
        "web-shard-0-a/001": "decode_error",
        "web-shard-0-a/002": "missing_image",
    }


def test_import_errors_name_the_folder_or_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        img2dataset_shards(tmp_path / "missing")
    with pytest.raises(ValueError, match="no img2dataset output"):
        img2dataset_shards(tmp_path)
    (tmp_path / "00000.tar").write_bytes(b"not a tar at all" * 100)
    for read in (import_img2dataset_shard, img2dataset_url_rows):
        with pytest.raises(ValueError, match="00000.tar"):
            read(tmp_path / "00000.tar", "web")


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and an empty IDAT: enough for Pillow to read the size, no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"")


def test_identify_image_keeps_pillows_decompression_bomb_limit():
    assert identify_image(png_header(40, 30)) == (40, 30)
    reason, detail = identify_image(png_header(30_000, 30_000))
    assert reason == "decompression_bomb" and "pixels" in detail
    assert identify_image(b"")[0] == "empty_body"
    assert identify_image(b"GIF89a\x00")[0] == "decode_error"


def test_plain_webdataset_tars_numbering_samples_alike_keep_them_apart_and_odd_json_is_coerced(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    for shard in ("part-a", "part-b"):  # both number their samples from 000
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            meta = json.dumps({"caption": 42, "url": "http://x/0.png", "punsafe": "0.1", "pwatermark": "n/a"}).encode()
            for name, data in (("000.png", VALID_PNG), ("000.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    rows = import_folder(folder, "web").kept.to_pylist()
    assert [row["key"] for row in rows] == ["web-part-a-000", "web-part-b-000"]
    assert (rows[0]["caption"], rows[0]["punsafe"], rows[0]["pwatermark"]) == ("42", 0.1, None)
