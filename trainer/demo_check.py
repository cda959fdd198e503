"""Does a generated demo image show what its prompt asked for? Simple image statistics, no learned model.

The background is the median of the image's border (the demo never draws a shape across the border);
the foreground is the largest connected region of pixels far from it. Its colour is the palette colour
nearest the foreground's median; its shape follows from how much of its bounding box it fills
(square ~1, circle pi/4 ~ 0.785, triangle ~0.5).

    score = score_images([(image, "a red circle on a white background"), ...])
    score.colour_accuracy, score.shape_accuracy
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from etl.demo_source import BACKGROUNDS, COLOUR_RGB, COLOURS, SHAPES, caption_for

# RGB distance from the background beyond which a pixel belongs to the foreground: the nearest demo colour
# is ~130 away from any background, JPEG ringing and generation noise stay well under 60.
FOREGROUND_DISTANCE = 60.0
# Fill-ratio boundaries halfway between triangle (0.5) and circle (0.785), and circle and square (1.0).
TRIANGLE_BELOW = 0.64
SQUARE_ABOVE = 0.89
MIN_FOREGROUND_PIXELS = 16  # less than this is no shape at all

_CAPTION = re.compile(rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) on an? ({'|'.join(BACKGROUNDS)}) background")


@dataclass(frozen=True)
class Reading:
    """What the image shows; ``colour`` and ``shape`` are None when no foreground was found."""

    colour: str | None
    shape: str | None
    fill_ratio: float  # foreground pixels / bounding-box pixels
    foreground_fraction: float  # of the whole image


@dataclass(frozen=True)
class Verdict:
    prompt: str
    colour: str
    shape: str
    reading: Reading

    @property
    def colour_ok(self) -> bool:
        return self.reading.colour == self.colour

    @property
    def shape_ok(self) -> bool:
        return self.reading.shape == self.shape


@dataclass(frozen=True)
class Score:
    verdicts: list[Verdict]

    @property
    def colour_accuracy(self) -> float:
        return sum(v.colour_ok for v in self.verdicts) / len(self.verdicts)

    @property
    def shape_accuracy(self) -> float:
        return sum(v.shape_ok for v in self.verdicts) / len(self.verdicts)

    def summary(self) -> str:
        misses = [f"  {v.prompt!r}: saw {v.reading.colour} {v.reading.shape} (fill {v.reading.fill_ratio:.2f})"
                  for v in self.verdicts if not (v.colour_ok and v.shape_ok)]
        head = (f"colour {self.colour_accuracy:.0%}, shape {self.shape_accuracy:.0%} "
                f"of {len(self.verdicts)} images")
        return "\n".join([head, *misses])


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a demo caption; anything else is an error."""
    match = _CAPTION.fullmatch(prompt.strip())
    if match is None:
        raise ValueError(f"not a demo caption: {prompt!r} (expected e.g. {caption_for('red', 'circle', 'white')!r})")
    return match.group(1), match.group(2), match.group(3)


def _background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def foreground_mask(image: Image.Image) -> np.ndarray:
    """The shape as a boolean (H, W) mask: the largest connected region of pixels far from the background,
    cut at half the way from the background to the shape's colour. A blurred edge is a ramp between the two
    colours; cutting at its middle keeps the shape's outline where a low cut would round it off."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = _background(pixels)
    distance = np.linalg.norm(pixels - background, axis=-1)
    core = _largest_region(distance > FOREGROUND_DISTANCE)
    if not core.any():
        return core
    contrast = float(np.linalg.norm(np.median(pixels[core], axis=0) - background))
    return _largest_region(distance > max(FOREGROUND_DISTANCE, contrast / 2))


def shape_of(fill_ratio: float) -> str:
    if fill_ratio < TRIANGLE_BELOW:
        return "triangle"
    return "square" if fill_ratio > SQUARE_ABOVE else "circle"


def nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.linalg.norm(rgb - np.asarray(COLOUR_RGB[name], np.float32))))


def read_image(image: Image.Image) -> Reading:
    mask = foreground_mask(image)
    area = int(mask.sum())
    if area < MIN_FOREGROUND_PIXELS:
        return Reading(None, None, 0.0, area / mask.size)
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = area / box
    median = np.median(np.asarray(image.convert("RGB"), dtype=np.float32)[mask], axis=0)
    return Reading(nearest_colour(median), shape_of(fill), fill, area / mask.size)


def judge(image: Image.Image, prompt: str) -> Verdict:
    colour, shape, _ = parse_prompt(prompt)
    return Verdict(prompt, colour, shape, read_image(image))


def score_images(pairs: list[tuple[Image.Image, str]]) -> Score:
    if not pairs:
        raise ValueError("score_images: no images to score")
    return Score([judge(image, prompt) for image, prompt in pairs])


def evaluation_prompts() -> list[str]:
    """Every colour x shape x background of the demo: the fixed prompt set of the learning check."""
    return [caption_for(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)]


def score_pipeline(pipe, prompts: list[str], seeds: list[int], resolution: int, steps: int = 20,
                   cfg: float = 3.0) -> Score:
    """Generate one image per prompt and seed with a ``trainer.pipeline.Pipeline`` and score them."""
    pairs = []
    for seed in seeds:
        images = pipe.generate(prompts, steps=steps, cfg=cfg, width=resolution, height=resolution, seed=seed)
        pairs += zip(images, prompts)
    return score_images(pairs)
