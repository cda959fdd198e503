"""`sd3 data run` end to end: real img2dataset downloads from a loopback server full of bad input,
through every Dagster asset, with the books checked at the end."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from etl.layout import DataLayout
from etl.report import pipeline_report
from tests.etl.bad_images import BAD_IMAGES, MARKER
from tests.etl.fault_server import FaultServer

RESOLUTIONS = [64, 128]
# Routes of the fault server and the download-stage reason each must produce.
HTTP_FAULTS = {"/404": "http_404", "/500": "http_500", "/slow": "timeout"}
# Served fine; the redirect, the PNG served as text/plain and /valid.png are the same bytes, so the
# first of them (smallest key) is kept and the other two are exact duplicates.
SERVED_FINE = {"/redirect": "kept", "/png-as-text": "duplicate", "/valid.png": "duplicate", "/valid.jpg": "kept"}


def shape_png(colour, size=(120, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def sd3(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def write_config(tmp: Path, urls: Path, **overrides) -> Path:
    config = {
        "root": str(tmp / "run"),
        "sources": [{"name": "web", "kind": "laion_parquet", "path": str(urls), "url_col": "URL",
                     "caption_col": "TEXT", "extra_cols": ["punsafe", "pwatermark"]}],
        "shard_size": 8,
        "download": {"processes": 1, "threads": 8, "timeout": 2, "retries": 0},
        "filter": {"min_side": 16, "max_punsafe": 0.5, "max_pwatermark": 0.8},
        "recaption": {"backend": "alt-text"},
        "buckets": {"resolutions": RESOLUTIONS, "format": "png"},
        "concurrency": 2,
        **overrides,
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data_run")
    with FaultServer(slow_seconds=4) as server:
        rows = []  # (url, caption, punsafe, expected: "kept" | a reason | "rejected")
        for path, reason in HTTP_FAULTS.items():
            rows.append((server.url(path), f"fault {path}", 0.1, reason))
        for path, expected in SERVED_FINE.items():
            rows.append((server.url(path), f"fine {path}", 0.1, expected))
        for name, (body, content_type, expected) in BAD_IMAGES.items():
            expected = "kept" if expected == "kept" else "rejected"
            rows.append((server.add(f"/bad/{name}", body, content_type), f"a picture of {name}", 0.1, expected))
        rows.append((server.add("/unsafe.png", shape_png((9, 9, 9)), "image/png"), "unsafe", 0.9, "punsafe"))
        rows.append((server.add("/empty-caption.png", shape_png((1, 2, 3)), "image/png"), "  ", 0.1, "rejected"))
        # The same image at two URLs, far enough apart to land in different shards.
        duplicate = shape_png((10, 200, 30))
        rows.insert(0, (server.add("/dup-first.png", duplicate, "image/png"), "first copy", 0.1, "kept"))
        rows.append((server.add("/dup-second.png", duplicate, "image/png"), "second copy", 0.1, "duplicate"))

        urls = tmp / "urls.parquet"
        pq.write_table(pa.table({
            "URL": [r[0] for r in rows], "TEXT": [r[1] for r in rows],
            "punsafe": [r[2] for r in rows], "pwatermark": [0.0] * len(rows),
        }), urls)
        config = write_config(tmp, urls)
        home = tmp / "dagster_home"
        first = sd3("data", "run", "--config", str(config), home=home)
        assert first.returncode == 0, first.stdout + first.stderr
        layout = DataLayout(tmp / "run")
        digests = {p: hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in sorted((tmp / "run").glob("[bi]*/**/*.parquet"))}
        # Forced, so every stage runs again (a plain rerun skips what is up to date: test_incremental_run.py).
        second = sd3("data", "run", "--config", str(config), "--force", home=home)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "[bucket_job] bucketed: " in second.stdout and "up to date" not in second.stdout, second.stdout
    expected = {f"web-{i:09d}": r[3] for i, r in enumerate(rows)}
    return dict(layout=layout, home=home, expected=expected, first=first, digests=digests)


@pytest.mark.slow
def test_every_row_is_accounted_for(finished_run):
    report = pipeline_report(finished_run["layout"], RESOLUTIONS)
    assert report.balanced, report.table()
    assert report.input_rows == len(finished_run["expected"])
    assert "accounting: every input row" in finished_run["first"].stdout


@pytest.mark.slow
def test_each_bad_input_gets_its_outcome(finished_run):
    layout = finished_run["layout"]
    rejects = pa.concat_tables([pq.read_table(p) for p in (layout.root / "rejects").glob("*/*.parquet")])
    reasons = dict(zip(rejects["key"].to_pylist(), rejects["reason"].to_pylist()))
    for resolution in RESOLUTIONS:
        kept = set(pa.concat_tables(
            [pq.read_table(p, columns=["key"]) for p in (layout.root / "buckets" / str(resolution)).glob("*.parquet")]
        )["key"].to_pylist())
        for key, expected in finished_run["expected"].items():
            if expected == "kept":
                assert key in kept, (key, reasons.get(key))
            else:
                assert key not in kept and key in reasons, key
                if expected != "rejected":
                    assert reasons[key] == expected, (key, reasons[key])
    assert all(reasons.values())


@pytest.mark.slow
def test_bucketed_images_are_upright_rgb_multiples_of_16(finished_run):
    layout = finished_run["layout"]
    exif_key = None
    for resolution in RESOLUTIONS:
        table = pa.concat_tables([pq.read_table(p) for p in (layout.root / "buckets" / str(resolution)).glob("*.parquet")])
        for row in table.to_pylist():
            img = Image.open(io.BytesIO(row["image"]))
            assert img.mode == "RGB" and img.size == (row["width"], row["height"])
            assert row["height"] % 16 == 0 and row["width"] % 16 == 0 and max(img.size) <= resolution
            assert row["recaption"].strip() and row["recaption_short"].strip()
            if row["url"].endswith("/bad/exif_rotated_jpeg"):
                exif_key = row["key"]
                # Portrait once upright (the file is stored lying on its side), marker top-left.
                assert row["height"] > row["width"]
                r, g, b = img.convert("RGB").getpixel((1, 1))
                assert r > 200 and g < 80 and b < 80, (r, g, b, MARKER)
    assert exif_key is not None


@pytest.mark.slow
def test_index_and_rematerialization_are_stable(finished_run):
    layout = finished_run["layout"]
    for resolution in RESOLUTIONS:
        index = pq.read_table(layout.index(resolution))
        assert index.num_rows == sum(pq.read_metadata(p).num_rows
                                     for p in (layout.root / "buckets" / str(resolution)).glob("*.parquet"))
    for path, digest in finished_run["digests"].items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed on re-materialization"


@pytest.mark.slow
def test_lineage_is_recorded_in_the_dagster_instance(finished_run, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(finished_run["home"]))
    with dg.DagsterInstance.get() as instance:
        shards = instance.get_dynamic_partitions("shards")
        assert shards == finished_run["layout"].shards() and len(shards) >= 3
        assert instance.get_materialized_partitions(dg.AssetKey("downloaded")) == set(shards)
        event = instance.get_latest_materialization_event(dg.AssetKey("bucket_index"))
        metadata = event.asset_materialization.metadata
        assert metadata["rows"].value > 0 and metadata["bucket_histogram"].value
        assert len(metadata["dataset_version"].value) >= 8
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("bucketed"), "bucket_invariants")])
        assert check, "bucket invariants were never checked"


def test_missing_column_is_a_clear_error(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.png"], "caption": ["x"]}), urls)
    result = sd3("data", "run", "--config", str(write_config(tmp_path, urls)), home=tmp_path / "home")
    assert result.returncode != 0
    assert "TEXT" in result.stderr


def test_unknown_config_key_is_named(tmp_path):
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"URL": [], "TEXT": []}, schema=pa.schema([("URL", pa.string()), ("TEXT", pa.string())])), urls)
    result = sd3("data", "run", "--config", str(write_config(tmp_path, urls, shard_sise=5)), home=tmp_path / "home")
    assert result.returncode != 0 and "shard_sise" in result.stderr


def test_empty_url_list_runs_to_an_empty_index(tmp_path):
    urls = tmp_path / "urls.parquet"
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("punsafe", pa.float64()),
                        ("pwatermark", pa.float64())])
    pq.write_table(schema.empty_table(), urls)
    result = sd3("data", "run", "--config", str(write_config(tmp_path, urls)), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    for resolution in RESOLUTIONS:
        assert pq.read_table(tmp_path / "run" / "index" / f"{resolution}.parquet").num_rows == 0


def test_already_downloaded_img2dataset_output_is_imported_not_fetched(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    members = {}
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        members[f"{i:09d}.png"] = shape_png(colour)
        members[f"{i:09d}.txt"] = f"a picture of colour {i}".encode()
        members[f"{i:09d}.json"] = json.dumps({"url": f"http://127.0.0.1:9/{i}.png"}).encode()  # never fetched
    members["000000003.txt"] = b"a caption without its image"
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = write_config(tmp_path, tmp_path / "unused.parquet",
                          sources=[{"name": "wds", "kind": "img2dataset", "path": str(folder)}])
    home = tmp_path / "home"
    first = sd3("data", "run", "--config", str(config), home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    layout = DataLayout(tmp_path / "run")
    assert layout.shards() == ["wds-00000"]
    for resolution in RESOLUTIONS:
        keys = pq.read_table(layout.index(resolution))["key"].to_pylist()
        # A tar without img2dataset's status parquet: its keys carry the tar's name (see _records_from_tar).
        assert sorted(keys) == ["wds-00000-000000000", "wds-00000-000000001", "wds-00000-000000002"]
    rejects = pq.read_table(layout.rejects("download", "wds-00000")).to_pylist()
    assert [(r["key"], r["reason"]) for r in rejects] == [("wds-00000-000000003", "missing_image")]
    again = sd3("data", "run", "--config", str(config), home=home)
    assert "[download_job] downloaded: 0 of 1 run(s), 1 up to date" in again.stdout, again.stdout
