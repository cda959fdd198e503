import argparse
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import sample_cli, sampling
from trainer.checkpoint import save_weights, step_folder
from trainer.encoders import Encoders, EncodersConfig
from trainer.model import MMDiT
from trainer.pipeline import Pipeline

STEPS = 4


def random_tiny_mmdit(seed: int, **overrides) -> MMDiT:
    """Random weights everywhere (the init zeroes the output layer, which would make v = 0 and hide
    whether the text reaches the image)."""
    torch.manual_seed(seed)
    model = MMDiT.from_preset("tiny", num_blocks=2, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    save_weights(step_folder(root, 7), random_tiny_mmdit(0), random_tiny_mmdit(1), EncodersConfig(preset="tiny"), {"step": 7})
    return root


@pytest.fixture(scope="module")
def pipeline(checkpoint):
    return Pipeline.from_checkpoint(checkpoint)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_loads_ema_weights_and_the_recorded_encoders(pipeline):
    assert torch.equal(pipeline.model.patch_embed.weight, random_tiny_mmdit(1).patch_embed.weight)
    assert pipeline.encoders.config == EncodersConfig(preset="tiny")
    assert pipeline.size_multiple == 16


def test_images_have_the_asked_non_square_size_and_record_their_settings(pipeline):
    images = pipeline.generate(["a red circle", "a blue square"], steps=STEPS, cfg=3.0, width=48, height=32, seed=11, batch_size=2)
    assert len(images) == 4
    assert all(im.size == (48, 32) and im.mode == "RGB" for im in images)
    assert [im.info["prompt"] for im in images] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert images[0].info | {"prompt": None} == {"prompt": None, "seed": 11, "batch_size": 2, "steps": STEPS, "cfg": 3.0,
                                                 "sampler": "euler", "shift": 1.0}
    assert [im.info["seed"] for im in images] == [11, 11, 12, 12]  # prompt i: seed + i
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # different noise within a batch


@pytest.mark.parametrize("sampler", ["euler", "euler_stochastic"])
def test_an_image_made_again_from_its_recorded_seed_alone_is_the_same(pipeline, sampler):
    kwargs = dict(steps=STEPS, width=32, height=32, sampler=sampler, batch_size=2)
    listed = pipeline.generate(["a red circle", "a blue square"], seed=7, **kwargs)
    alone = pipeline.generate("a blue square", seed=listed[2].info["seed"], **kwargs)
    other_seed = pipeline.generate("a blue square", seed=listed[2].info["seed"] + 1, **kwargs)

    def level_gap(a, b) -> int:
        return int(np.abs(pixels(a).astype(int) - pixels(b).astype(int)).max())

    # Alone, the prompt's text is encoded in a batch of one: float rounding, a level at most.
    assert [level_gap(a, b) <= 2 for a, b in zip(listed[2:], alone)] == [True, True]
    assert min(level_gap(a, b) for a, b in zip(alone, other_seed)) > 20


def test_same_seed_same_image_and_the_prompt_matters(pipeline):
    kwargs = dict(steps=STEPS, width=32, height=32)
    first = pipeline.generate("a red circle on a white background", seed=5, **kwargs)[0]
    again = pipeline.generate("a red circle on a white background", seed=5, **kwargs)[0]
    other_prompt = pipeline.generate("a green triangle on a black background", seed=5, **kwargs)[0]
    assert np.array_equal(pixels(first), pixels(again))
    assert np.abs(pixels(first) - pixels(other_prompt)).max() > 0

    drawn = pipeline.generate("a red circle", seed=-1, **kwargs)[0]
    assert 0 <= drawn.info["seed"] < 2**31
    replay = pipeline.generate("a red circle", seed=drawn.info["seed"], **kwargs)[0]
    assert np.array_equal(pixels(drawn), pixels(replay))


@pytest.mark.parametrize("sampler", ["euler_stochastic", "heun"])
def test_every_sampler_runs(pipeline, sampler):
    (image,) = pipeline.generate("a blue square", steps=STEPS, sampler=sampler, width=32, height=48, seed=0)
    assert image.size == (32, 48)


def test_bad_sampling_settings_are_refused_before_any_text_is_encoded(pipeline, monkeypatch):
    monkeypatch.setattr(pipeline.encoders, "encode_text", lambda prompts: pytest.fail("encoded the text"))
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        pipeline.generate("a blue square", sampler="dpm")
    with pytest.raises(ValueError, match="timestep shift must be > 0, got 0"):
        pipeline.generate("a blue square", shift=0.0)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        pipeline.generate("a blue square", steps=0)


def test_trajectory_has_one_frame_per_step_ending_at_the_image(pipeline):
    images, frames = pipeline.generate("a yellow circle", steps=STEPS, width=32, height=16, seed=2, batch_size=2, trajectory=True)
    assert len(frames) == 2 and all(len(f) == STEPS for f in frames)
    for image, image_frames in zip(images, frames):
        assert np.array_equal(pixels(image_frames[-1]), pixels(image))
        assert not np.array_equal(pixels(image_frames[0]), pixels(image))


def test_bad_sizes_are_clear_errors(pipeline):
    with pytest.raises(ValueError, match=r"width 50 is not a positive multiple of 16.*try 48 or 64"):
        pipeline.generate("a red circle", width=50, height=32)
    with pytest.raises(ValueError, match="height 0 .*the smallest is 16"):
        pipeline.generate("a red circle", width=32, height=0)
    with pytest.raises(ValueError, match="height -16 .*the smallest is 16"):
        pipeline.generate("a red circle", width=32, height=-16)


def test_model_and_encoders_that_do_not_fit_are_refused():
    encoders = Encoders(EncodersConfig(preset="tiny"))
    with pytest.raises(ValueError, match="text_dim 32 but the encoders give 64"):
        Pipeline(random_tiny_mmdit(0, text_dim=32), encoders)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sd3")
    sample_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sample", *argv])
    return args.func(args)


def test_cli_rejects_bad_input_before_loading(tmp_path, capsys):
    assert run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--width", "500", "--out", str(tmp_path / "a.png")) == 1
    assert "width 500 is not a positive multiple of 16" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "a.png")) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--device", "cuda", "--out", str(tmp_path / "a.png")) == 1
        assert "--device cuda: this machine has no usable CUDA device" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--device", "gpu", "--out", str(tmp_path / "a.png")) == 1
    assert "--device gpu:" in capsys.readouterr().err
    # An empty folder is no checkpoint: each of these is refused before the checkpoint is looked at.
    assert run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--shift", "0", "--out", str(tmp_path / "a.png")) == 1
    assert "timestep shift must be > 0" in capsys.readouterr().err
    assert run_cli("--checkpoint", str(tmp_path), "--prompt", "x", "--gif", str(tmp_path / "t.png"),
                   "--out", str(tmp_path / "a.png")) == 1
    assert "the trajectory is a GIF; name it .gif" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_sampler_names_match_the_samplers():
    assert set(sample_cli.SAMPLERS) == set(sampling.SAMPLERS)


def test_sd3_sample_end_to_end_writes_pngs_and_gifs(checkpoint, tmp_path):
    out, gif = tmp_path / "out" / "img.png", tmp_path / "out" / "traj.gif"
    command = [
        sys.executable, "-m", "orchestration.cli", "sample", "--checkpoint", str(checkpoint),
        "--prompt", "a red circle on a white background", "--steps", str(STEPS), "--cfg", "5",
        "--sampler", "heun", "--width", "64", "--height", "32", "--seed", "3", "--batch-size", "2",
        "--out", str(out), "--gif", str(gif), "--gif-fps", "5",
    ]
    # As many threads as this process uses: another count splits the matmul sums differently, and one
    # rounding step can flip a pixel.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "seed 3" in done.stdout
    for i in range(2):
        with Image.open(tmp_path / "out" / f"img_{i}.png") as png:
            assert png.size == (64, 32) and png.text["seed"] == "3" and png.text["sampler"] == "heun"
        with Image.open(tmp_path / "out" / f"traj_{i}.gif") as animation:
            assert animation.size == (64, 32) and animation.n_frames == STEPS
            assert animation.info["duration"] == 200
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_0.png", "img_1.png", "traj_0.gif", "traj_1.gif"]

    # The in-process pipeline with the same settings gives the same pixels as the command.
    images = Pipeline.from_checkpoint(checkpoint).generate(
        "a red circle on a white background", steps=STEPS, cfg=5, sampler="heun", width=64, height=32, seed=3, batch_size=2
    )
    with Image.open(tmp_path / "out" / "img_1.png") as png:
        assert np.array_equal(pixels(png.convert("RGB")), pixels(images[1]))


def test_sampling_far_above_max_res_warns(pipeline, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.pipeline"):
        pipeline.generate("a red circle", steps=1, width=512, height=512, seed=0)
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        pipeline.generate("a red circle", steps=1, width=528, height=16, seed=0)
    assert "sampling 528x16, over twice the model's max_res of 256 px" in caplog.text


def test_a_pipeline_over_encoders_another_thread_uses_leaves_them_in_place(pipeline, monkeypatch):
    # A colocated rank samples with its feeder's encoders, which its feeder thread keeps encoding with.
    shared = Pipeline(pipeline.model, pipeline.encoders, offload_text_encoders=False)
    monkeypatch.setattr(pipeline.encoders, "free_text_encoders", lambda: pytest.fail("offloaded shared encoders"))
    (image,) = shared.generate("a red circle", steps=1, width=32, height=32, seed=0)
    assert image.size == (32, 32)
