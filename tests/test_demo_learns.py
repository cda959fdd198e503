"""The demo configuration learns: after `make demo`'s training (configs/train/demo.yaml, torchrun, 1 loader
+ 3 model ranks), generated images show the prompted colour and shape, read by image statistics."""

from __future__ import annotations

import os
import subprocess

import pytest

from scripts.demo import SAMPLE_CFG, SAMPLE_STEPS, TRAIN_CONFIG, demo_resolution, train_command
from tests.trainer.demo_dataset import build_demo_dataset
from trainer.demo_check import evaluation_prompts, score_pipeline
from trainer.pipeline import Pipeline

DATASET_IMAGES = 360  # every colour x shape x background ten times
SEEDS = [0, 1]
TRAIN_TIMEOUT_S = 2400  # bounds a hang; the run takes 8 min on a quiet 2-core box, 17 on a slower one (CI, 2026-12-07)


@pytest.mark.slow
@pytest.mark.timeout(TRAIN_TIMEOUT_S + 600)
def test_demo_training_follows_colour_and_shape_prompts(tmp_path):
    resolution = demo_resolution()
    root = build_demo_dataset(tmp_path / "data", n=DATASET_IMAGES, resolution=resolution)
    run_dir = tmp_path / "run"
    # No DAGSTER_HOME: this run's checkpoints must not show up in the developer's lineage UI.
    env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"} | {"OMP_NUM_THREADS": "1"}
    finished = subprocess.run(train_command(TRAIN_CONFIG, f"data.root={root}", f"checkpoint.dir={run_dir}"),
                              env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
    assert finished.returncode == 0, finished.stderr[-5000:]

    pipe = Pipeline.from_checkpoint(run_dir)
    score = score_pipeline(pipe, evaluation_prompts(), SEEDS, resolution, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG)
    print(score.summary())
    assert score.colour_accuracy >= 0.9, score.summary()
    assert score.shape_accuracy >= 0.7, score.summary()
