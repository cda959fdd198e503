"""The self-made demo data set: exact captions, varied sizes, clear shapes, downloadable over loopback."""

from __future__ import annotations

import hashlib
import io
import re
import urllib.request

import numpy as np
from PIL import Image

from etl.config import DownloadConfig
from etl.demo_source import BACKGROUND_RGB, BACKGROUNDS, COLOUR_RGB, COLOURS, SHAPES, make_demo_source
from etl.download import download_shard
from etl.serve import serve_directory
from etl.sources import shard_url_list
from etl.storage import read_parquet

CAPTION = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on a ({'|'.join(BACKGROUNDS)}) background")


def test_captions_sizes_and_pixels(tmp_path):
    n = 40
    urls = read_parquet(make_demo_source(tmp_path, n, "http://host:1", seed=3))
    assert urls.column_names == ["url", "caption"] and urls.num_rows == n
    sizes, formats, combos = [], set(), set()
    for url, caption in zip(urls["url"].to_pylist(), urls["caption"].to_pylist()):
        match = CAPTION.fullmatch(caption)
        assert match, caption
        colour, shape, background = match.groups()
        combos.add(match.groups())
        assert url.startswith("http://host:1/images/")
        with Image.open(tmp_path / "images" / url.rsplit("/", 1)[1]) as image:
            formats.add(image.format)
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        height, width = pixels.shape[:2]
        sizes.append((width, height))
        assert 96 <= min(width, height) <= 512 and max(width, height) / min(width, height) <= 2.01
        # the corner shows the background, the centre shows the shape's colour
        assert np.abs(pixels[1, 1] - BACKGROUND_RGB[background]).max() < 30
        assert np.abs(pixels[height // 2, width // 2] - COLOUR_RGB[colour]).max() < 30
        coloured = (np.abs(pixels - COLOUR_RGB[colour]).max(axis=-1) < 40).mean()
        assert 0.03 < coloured < 0.45, (caption, coloured)  # large and clear, never filling the frame
    assert formats == {"PNG", "JPEG"}
    assert len(combos) == len(COLOURS) * len(SHAPES) * len(BACKGROUNDS)  # 40 >= 36: every combination
    aspects = [w / h for w, h in sizes]
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    assert len({min(s) for s in sizes}) > 10


def test_deterministic_from_seed(tmp_path):
    def digest(folder, seed):
        make_demo_source(folder, 6, "http://h", seed=seed)
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "images").iterdir())]

    assert digest(tmp_path / "a", 1) == digest(tmp_path / "b", 1)
    assert digest(tmp_path / "a", 1) != digest(tmp_path / "c", 2)


def test_served_files_download_with_img2dataset(tmp_path):
    (tmp_path / "demo").mkdir()
    with serve_directory(tmp_path / "demo") as base_url:
        urls = read_parquet(make_demo_source(tmp_path / "demo", 5, base_url))
        first_url = urls["url"][0].as_py()
        with urllib.request.urlopen(first_url) as response:
            assert response.read() == (tmp_path / "demo" / "images" / first_url.rsplit("/", 1)[1]).read_bytes()
        table = urls.append_column("source", [["demo"] * 5])
        [(_, shard)] = shard_url_list(table, "demo", 10)
        result = download_shard(shard, tmp_path / "work", DownloadConfig(processes=1, threads=2, timeout=5))
    assert result.counts == {"kept": 5}
    for row in result.kept.to_pylist():
        path = tmp_path / "demo" / "images" / row["url"].rsplit("/", 1)[1]
        assert row["image"] == path.read_bytes()
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.size == (row["width"], row["height"])
        assert CAPTION.fullmatch(row["caption"])


def test_serve_directory_stops_on_exit(tmp_path):
    (tmp_path / "hello.txt").write_text("hi")
    with serve_directory(tmp_path) as base_url:
        with urllib.request.urlopen(f"{base_url}/hello.txt") as response:
            assert response.read() == b"hi"
    try:
        urllib.request.urlopen(f"{base_url}/hello.txt", timeout=2)
    except OSError as err:
        assert "refused" in str(err).lower()
    else:
        raise AssertionError("the server still answers after the context exited")
