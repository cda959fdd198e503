"""`make demo`: the whole chain on this machine, offline.

Generates the coloured-shapes source, serves it on 127.0.0.1, runs the Dagster data pipeline on it
(img2dataset download -> filter -> recaption -> buckets -> index), trains the tiny MMDiT with torchrun
(1 loader + 3 model ranks over gloo), then samples a labelled grid of every colour x shape x background
into demo_out/grid.png, scores it with trainer.demo_check, and writes one denoising trajectory as
demo_out/trajectory.gif. Pipeline runs and checkpoints land in ./.dagster, so `make ui` afterwards shows
their lineage.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image, ImageDraw  # noqa: E402

from etl.demo_source import BACKGROUNDS, COLOURS, SHAPES, caption_for, make_demo_source  # noqa: E402
from etl.serve import serve_directory  # noqa: E402

SOURCE = REPO / "demo_data" / "source"
DATA_CONFIG = REPO / "configs" / "data" / "demo.yaml"
TRAIN_CONFIG = REPO / "configs" / "train" / "demo.yaml"
OUT = REPO / "demo_out"
PORT = int(os.environ.get("SD3_DEMO_PORT", "8765"))
IMAGES = int(os.environ.get("SD3_DEMO_IMAGES", "1000"))

# Sampling settings of the grid, the GIF and the learning test (tests/test_demo_learns.py).
SAMPLE_STEPS = 20
SAMPLE_CFG = 3.0
GRID_SEED = 0
TRAJECTORY_PROMPT = caption_for("red", "circle", "white")
CELL = 96  # grid cell side in pixels; samples are upscaled to it with NEAREST so their pixels stay visible
LABEL_BAND = 20


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def train_command(config: Path, *overrides: str) -> list[str]:
    """torchrun with 4 processes (1 loader + 3 model ranks); --standalone picks a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
            str(REPO / "trainer" / "train.py"), "--config", str(config), *overrides]


def demo_resolution(config: Path = TRAIN_CONFIG) -> int:
    from trainer.config import load_train_config

    return load_train_config(config, []).data.resolution


def grid_prompts() -> list[list[str]]:
    """Rows: colours; columns: every shape on every background."""
    return [[caption_for(c, s, b) for s in SHAPES for b in BACKGROUNDS] for c in COLOURS]


def draw_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    width = LABEL_BAND * 3 + CELL * len(column_labels)
    height = LABEL_BAND * 2 + CELL * len(rows)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    left, top = LABEL_BAND * 3, LABEL_BAND * 2
    for j, label in enumerate(column_labels):
        shape, background = label.split("/")
        draw.text((left + j * CELL + 4, 2), shape, fill=(0, 0, 0))
        draw.text((left + j * CELL + 4, LABEL_BAND), f"on {background}", fill=(90, 90, 90))
    for i, (label, images) in enumerate(zip(row_labels, rows)):
        draw.text((4, top + i * CELL + CELL // 2 - 6), label, fill=(0, 0, 0))
        for j, image in enumerate(images):
            grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (left + j * CELL, top + i * CELL))
    return grid


def sample_outputs(checkpoint_dir: Path, out: Path, resolution: int) -> str:
    """Write grid.png and trajectory.gif into ``out``; returns the demo_check score summary of the grid."""
    from trainer.demo_check import score_images
    from trainer.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(checkpoint_dir)
    prompts = grid_prompts()
    flat = [p for row in prompts for p in row]
    images = pipe.generate(flat, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, width=resolution, height=resolution, seed=GRID_SEED)
    per_row = len(prompts[0])
    rows = [images[i : i + per_row] for i in range(0, len(images), per_row)]
    columns = [f"{s}/{b}" for s in SHAPES for b in BACKGROUNDS]
    out.mkdir(parents=True, exist_ok=True)
    draw_grid(rows, list(COLOURS), columns).save(out / "grid.png")

    _, frames = pipe.generate(TRAJECTORY_PROMPT, steps=SAMPLE_STEPS, cfg=SAMPLE_CFG, width=resolution,
                              height=resolution, seed=GRID_SEED, trajectory=True)
    big = [f.resize((CELL * 2, CELL * 2), Image.Resampling.NEAREST) for f in frames[0]]
    # The last frame is held for a second so the result is visible before the loop restarts.
    big[0].save(out / "trajectory.gif", save_all=True, append_images=big[1:], duration=[120] * (len(big) - 1) + [1000],
                loop=0)
    return score_images(list(zip(images, flat))).summary()


def main() -> int:
    from orchestration.cli import dagster_home
    from orchestration.run import run_pipeline
    from trainer.config import load_train_config

    os.chdir(REPO)
    home = dagster_home()
    if not port_is_free(PORT):
        print(f"port {PORT} is taken; set SD3_DEMO_PORT to a free port", file=sys.stderr)
        return 1
    run_dir = load_train_config(TRAIN_CONFIG, []).checkpoint.dir
    resolution = demo_resolution()
    timings: dict[str, float] = {}

    start = time.perf_counter()
    print(f"[1/4] demo source: {IMAGES} coloured shapes -> {SOURCE.relative_to(REPO)}", flush=True)
    make_demo_source(SOURCE, IMAGES, f"http://127.0.0.1:{PORT}", seed=0)
    timings["demo source"] = time.perf_counter() - start

    stage = time.perf_counter()
    print(f"[2/4] data pipeline ({DATA_CONFIG.relative_to(REPO)}) over http://127.0.0.1:{PORT}", flush=True)
    with serve_directory(SOURCE, port=PORT):
        report = run_pipeline(DATA_CONFIG)
    print(report.table(), flush=True)
    timings["data pipeline"] = time.perf_counter() - stage

    stage = time.perf_counter()
    if run_dir.exists():
        print(f"      removing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    command = train_command(TRAIN_CONFIG)
    print(f"[3/4] training: torchrun --standalone --nproc_per_node=4 trainer/train.py --config "
          f"{TRAIN_CONFIG.relative_to(REPO)}", flush=True)
    # OMP_NUM_THREADS=1 per rank (torchrun's default too): four ranks already share the cores.
    finished = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    if finished.returncode != 0:
        print(f"training failed (exit {finished.returncode}); see the rank logs above", file=sys.stderr)
        return finished.returncode
    timings["training"] = time.perf_counter() - stage

    stage = time.perf_counter()
    print(f"[4/4] sampling {len(COLOURS) * len(SHAPES) * len(BACKGROUNDS)} prompts and a trajectory", flush=True)
    summary = sample_outputs(run_dir, OUT, resolution)
    timings["sampling"] = time.perf_counter() - stage

    print("\nstage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    print(f"done in {time.perf_counter() - start:.0f} s.")
    print(f"prompt following (trainer/demo_check.py): {summary}")
    print(f"  grid of every colour x shape x background: {OUT / 'grid.png'}")
    print(f"  one denoising trajectory:                  {OUT / 'trajectory.gif'}")
    print(f"  checkpoints and metrics.jsonl:             {run_dir}")
    print(f"  buckets and index:                         {REPO / 'demo_data' / 'pipeline'}")
    print(f"  sample more: .venv/bin/sd3 sample --checkpoint {run_dir} --prompt \"{TRAJECTORY_PROMPT}\" "
          f"--width {resolution} --height {resolution} --out demo_out/sample.png")
    print(f"lineage UI: `make ui` (DAGSTER_HOME={home}), then open http://127.0.0.1:3000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
