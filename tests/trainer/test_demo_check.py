"""The demo classifier reads the real demo source's images (PNG and JPEG, every size) correctly."""

from __future__ import annotations

import pytest
from PIL import Image

from etl.demo_source import BACKGROUND_RGB, make_demo_source
from etl.storage import read_parquet
from trainer.demo_check import evaluation_prompts, judge, parse_prompt, read_image, score_images

N_IMAGES = 108  # every colour x shape x background combination four times


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    source = tmp_path_factory.mktemp("demo_source")
    urls = read_parquet(make_demo_source(source, N_IMAGES, "http://127.0.0.1:0", seed=3))
    pairs = []
    for url, caption in zip(urls["url"].to_pylist(), urls["caption"].to_pylist()):
        with Image.open(source / "images" / url.rsplit("/", 1)[1]) as image:
            pairs.append((image.convert("RGB"), caption))
    return pairs


def test_reads_every_demo_source_image_right(demo_images):
    score = score_images(demo_images)
    assert score.colour_accuracy == 1.0, score.summary()
    assert score.shape_accuracy == 1.0, score.summary()


@pytest.mark.parametrize("size", [(64, 64), (128, 64)])
def test_reads_downscaled_demo_images(demo_images, size):
    """Generated images are small (64-128 px): the readings must survive the demo's training resolutions."""
    score = score_images([(image.resize(size, Image.Resampling.LANCZOS), caption) for image, caption in demo_images])
    assert score.colour_accuracy == 1.0, score.summary()
    assert score.shape_accuracy >= 0.95, score.summary()


def test_wrong_prompt_is_scored_wrong(demo_images):
    image, caption = demo_images[0]
    colour, shape, background = parse_prompt(caption)
    other_colour = "green" if colour != "green" else "red"
    other_shape = "square" if shape != "square" else "circle"
    verdict = judge(image, f"a {other_colour} {other_shape} on a {background} background")
    assert not verdict.colour_ok and not verdict.shape_ok


def test_blank_image_has_no_shape():
    reading = read_image(Image.new("RGB", (64, 64), BACKGROUND_RGB["grey"]))
    assert reading.colour is None and reading.shape is None
    assert not judge(Image.new("RGB", (64, 64), (0, 0, 0)), "a red circle on a black background").colour_ok


def test_evaluation_prompts_cover_the_demo_and_parse():
    prompts = evaluation_prompts()
    assert len(prompts) == len(set(prompts)) == 36
    assert {parse_prompt(p)[:2] for p in prompts} == {(c, s) for c in ("red", "green", "blue", "yellow")
                                                     for s in ("circle", "square", "triangle")}


def test_non_demo_prompt_is_an_error():
    with pytest.raises(ValueError, match="not a demo caption"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="no images"):
        score_images([])
