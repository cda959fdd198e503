"""Bucket resize throughput: etl.buckets.bucket_shard vs the seed-style loop, one process, same images.

Reference: pandas ``iterrows``, full-resolution decode, LANCZOS resize to the same bucket, re-encode in
the same format. Images are photo-like JPEGs of 1-4 MP (smooth noise fields, hard edges, drawn text,
sensor-like grain), not flat colours, so JPEG draft decoding and box reduction are tested on real structure.
Quality: PSNR of ours (decoded) against the reference's full-resolution LANCZOS pixels before encoding;
for jpeg/webp the reference's own decoded output is scored the same way, so the codec's share is visible.

    .venv/bin/python benchmarks/bucket_resize.py                       # 24 images, 256 and 512, ~2 min
    .venv/bin/python benchmarks/bucket_resize.py --images 100 --resolutions 256 512 1024
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from etl.buckets import bucket_shard, bucket_size
from etl.config import BucketConfig
from etl.images import to_rgb

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
SIZES = [(1280, 960), (1600, 1200), (1920, 1080), (2048, 1536), (1200, 1800), (2304, 1728), (1080, 1350)]


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Multi-scale smooth noise + shapes with hard edges + text + grain: compresses and resizes like a photo."""
    field = np.zeros((height, width, 3), np.float32)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        coarse = rng.integers(0, 256, (cells, cells * width // height + 1, 3), dtype=np.uint8)
        field += weight * np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        size = int(rng.integers(20, max(21, width // 4)))
        if rng.random() < 0.5:
            draw.ellipse([x, y, x + size, y + size // 2], fill=colour)
        else:
            draw.rectangle([x, y, x + size, y + size], outline=colour, width=int(rng.integers(1, 6)))
        draw.text((x, y), "Sample text 0123", fill=(0, 0, 0), font_size=int(rng.integers(12, 60)))
    img = img.filter(ImageFilter.GaussianBlur(0.6))  # optics: no perfectly sharp synthetic edges
    grain = rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        photo_like(*SIZES[i % len(SIZES)], rng).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def reference_resize(frame: pd.DataFrame, resolution: int, fmt: str, quality: int):
    """The seed-style loop; returns the encoded outputs and the pre-encode pixels (for PSNR)."""
    encoded, pixels = [], []
    for _, row in frame.iterrows():
        img = to_rgb(Image.open(io.BytesIO(row["image"])))
        height, width = bucket_size(img.height, img.width, resolution)
        resized = img.resize((width, height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        resized.save(buffer, PIL_FORMATS[fmt], **({} if fmt == "png" else {"quality": quality}))  # Pillow defaults
        encoded.append(buffer.getvalue())
        pixels.append(np.asarray(resized))
    return encoded, pixels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def cpu_timed(fn, *args):
    """Process CPU seconds (the machine is shared, so wall time would count other people's work too)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--formats", nargs="+", default=["png", "jpeg", "webp"])
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()

    jpegs = make_jpegs(args.images)
    megapixels = [Image.open(io.BytesIO(d)).size for d in jpegs]
    print(f"{len(jpegs)} photo-like JPEGs, {min(w * h for w, h in megapixels) / 1e6:.1f}-"
          f"{max(w * h for w, h in megapixels) / 1e6:.1f} MP, mean {np.mean([len(d) for d in jpegs]) / 1e3:.0f} KB")
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(len(jpegs))], "image": jpegs})
    table = pa.table({"key": frame["key"], "url": [""] * len(jpegs), "image": pa.array(jpegs, pa.binary())})

    print(f"{'R':>5} {'format':>6} {'reference img/s/core':>21} {'ours img/s/core':>16} {'speedup':>8} "
          f"{'PSNR ours min/median':>21} {'PSNR ref median':>16} {'KB ref/ours':>14}")
    for resolution in args.resolutions:
        for fmt in args.formats:
            (ref_encoded, ref_pixels), ref_cpu, _ = cpu_timed(reference_resize, frame, resolution, fmt, args.quality)
            cfg = BucketConfig(format=fmt, quality=args.quality)
            result, ours_cpu, _ = cpu_timed(bucket_shard, table, resolution, cfg)
            assert result.rejects.num_rows == 0
            ours = [decoded(b) for b in result.kept["image"].to_pylist()]
            scores = [psnr(a, b) for a, b in zip(ours, ref_pixels)]
            ref_scores = [psnr(decoded(b), p) for b, p in zip(ref_encoded, ref_pixels)]
            ref_kb = np.mean([len(b) for b in ref_encoded]) / 1e3
            ours_kb = np.mean([len(b) for b in result.kept["image"].to_pylist()]) / 1e3
            print(f"{resolution:>5} {fmt:>6} {len(jpegs) / ref_cpu:>21.1f} {len(jpegs) / ours_cpu:>16.1f} "
                  f"{ref_cpu / ours_cpu:>7.1f}x {min(scores):>12.1f} / {np.median(scores):<6.1f} "
                  f"{np.median(ref_scores):>16.1f} {ref_kb:>6.1f} / {ours_kb:<6.1f}")


if __name__ == "__main__":
    main()
