"""A demo data set the project makes itself: coloured shapes on plain backgrounds, with exact captions.

Every (colour, shape, background) combination appears equally often, so a small model can learn
colour and shape from a few hundred images. Sizes and aspect ratios vary so the bucketing has work to do.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw

from etl.storage import write_parquet_atomic

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "grey")

COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}

MIN_SHORT_SIDE, MAX_SHORT_SIDE = 96, 512
MAX_ASPECT = 2.0  # long side / short side, either orientation
SHAPE_FRACTION = (0.3, 0.6)  # of the shorter side
JITTER_FRACTION = 0.08  # centre offset, of the shorter side
SUPERSAMPLE = 4  # draw large and downsample: PIL's polygon/ellipse drawing is not anti-aliased


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw_shape(
    width: int, height: int, colour: str, shape: str, background: str, extent: float, offset: tuple[float, float]
) -> Image.Image:
    """``extent``: the shape's size in pixels; ``offset``: its centre's shift from the image centre."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (width * s, height * s), BACKGROUND_RGB[background])
    draw = ImageDraw.Draw(image)
    cx, cy = (width / 2 + offset[0]) * s, (height / 2 + offset[1]) * s
    half = extent * s / 2
    fill = COLOUR_RGB[colour]
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box so it looks as large as the other shapes.
        tri_height = half * math.sqrt(3)
        top, bottom = cy - tri_height / 2, cy + tri_height / 2
        draw.polygon([(cx, top), (cx + half, bottom), (cx - half, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _random_size(rng: random.Random) -> tuple[int, int]:
    short = rng.randint(MIN_SHORT_SIDE, MAX_SHORT_SIDE)
    aspect = math.exp(rng.uniform(0.0, math.log(MAX_ASPECT)))
    long = round(short * aspect)
    return (long, short) if rng.random() < 0.5 else (short, long)


def make_demo_source(out_dir: Path, n: int, base_url: str, seed: int = 0) -> Path:
    """Write ``n`` images to ``out_dir/images/`` and their URL list to ``out_dir/urls.parquet`` (returned)."""
    if n < 1:
        raise ValueError(f"make_demo_source: n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES, BACKGROUNDS))
    order: list[tuple[str, str, str]] = []
    while len(order) < n:
        cycle = combos[:]
        rng.shuffle(cycle)
        order.extend(cycle)

    urls, captions = [], []
    for i, (colour, shape, background) in enumerate(order[:n]):
        width, height = _random_size(rng)
        short = min(width, height)
        extent = short * rng.uniform(*SHAPE_FRACTION)
        offset = (rng.uniform(-1, 1) * JITTER_FRACTION * short, rng.uniform(-1, 1) * JITTER_FRACTION * short)
        image = draw_shape(width, height, colour, shape, background, extent, offset)
        if rng.random() < 0.5:
            name = f"{i:06d}.png"
            image.save(images_dir / name, format="PNG")
        else:
            name = f"{i:06d}.jpg"
            image.save(images_dir / name, format="JPEG", quality=92)
        urls.append(f"{base_url.rstrip('/')}/images/{name}")
        captions.append(caption_for(colour, shape, background))

    table = pa.table({"url": pa.array(urls, pa.string()), "caption": pa.array(captions, pa.string())})
    return write_parquet_atomic(table, out_dir / "urls.parquet")
