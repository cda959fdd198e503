"""Colocated training throughput on one GPU: `trainer/train.py` with `topology.colocated=true`, the one
process decoding, encoding and training, as on a single-GPU box or a laptop.

Each case is a real training run of the trainer on demo data built by the test helper (coloured shapes,
bucketed like the pipeline does), read back from its metrics.jsonl: steps/s, images/s and the share of
each step spent waiting for data. The first steps (process start, first batches, compilation) are left out.
"Mean image" is the side of a square of the trained images' mean pixels: aspect-ratio buckets keep the long
side at the resolution, so a "256 px" run trains on fewer pixels than 256 x 256 squares.

  * tiny        the demo's model and encoders (configs/train/demo.yaml) at 64 px
  * mid-300m    the `mid-300m` MMDiT at 256 px with the tiny encoders: the model alone sets the pace
  * mid-300m + reference encoders
                the same model fed by the reference's VAE and text encoders at their real sizes (random
                weights, the folders `encoders.py --save DIR` writes), only with --encoders DIR: the cost of
                encoding online on the training GPU

    python benchmarks/gpu/encoders.py --save /tmp/encoders && \\
    python benchmarks/gpu/colocated.py --encoders /tmp/encoders    # one H100/H200, about 2 minutes
    python benchmarks/gpu/colocated.py --smoke                       # CPU, a few steps: checks the script runs
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without installing; the demo data builder lives with the tests

from tests.trainer.demo_dataset import build_demo_dataset  # noqa: E402
from trainer.data import BucketSampler, open_index  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "train" / "demo.yaml"
MIN_CASE_S = 15  # a trainer start-up alone takes seconds: a case with less left is skipped, not started


class Skipped(Exception):
    """A case left out for want of time."""


@dataclass
class Case:
    name: str
    resolution: int
    batch: int
    steps: int
    warmup: int
    overrides: list[str]


def mid_model(resolution: int, text_dim: int | None) -> list[str]:
    overrides = {"max_res": resolution, "max_res_orig": resolution}
    if text_dim:  # the tiny encoders write narrower text and pooled vectors than the reference's
        overrides |= {"text_dim": text_dim, "pooled_dim": text_dim}
    return ["model.preset=mid-300m", f"model.overrides={overrides}"]


def cases(args) -> list[Case]:
    if args.smoke:
        return [Case("tiny", 64, 2, 6, 2, [])]
    mid = args.resolution
    result = [Case("tiny", 64, 32, 120, 20, [])]
    if args.encoders:  # before the tiny encoders' case: the figure that sizes a colocated box, if time runs short
        folder = Path(args.encoders).resolve()
        result.append(Case("mid-300m, reference encoders", mid, args.batch, args.steps, 10, [
            *mid_model(mid, None), "encoders.preset=reference", "encoders.dtype=bfloat16", "encoders.text_len=77",
            *(f"encoders.{name}={folder / name}" for name in ("vae", "gemma", "bert", "clip")),
        ]))
    result.append(Case("mid-300m, tiny encoders", mid, args.batch, args.steps, 10,
                       [*mid_model(mid, 64), "encoders.preset=tiny", "encoders.text_len=77"]))
    return result


def trained_side(data_root: Path, resolution: int, batch: int) -> float:
    """The side of a square of the mean pixels of the images one epoch of the trainer's sampler draws. Buckets
    keep the long side at the resolution and buckets smaller than a batch are dropped, so the images have
    fewer pixels than resolution^2: images/s are of these, not of squares."""
    index = open_index(data_root, resolution)
    sampler = BucketSampler(index, batch, seed=0)
    batches = iter(sampler)
    rows = np.concatenate([next(batches) for _ in range(sampler.batches_per_epoch)])
    return math.sqrt(float(np.mean(index["height"].to_numpy()[rows] * index["width"].to_numpy()[rows])))


def run_case(case: Case, data_root: Path, run_dir: Path, compile_model: bool, workers: int, timeout_s: float) -> dict:
    command = [sys.executable, str(REPO / "trainer" / "train.py"), "--config", str(DEMO_CONFIG),
               "topology.colocated=true", "train.precision=auto", f"train.compile={str(compile_model).lower()}",
               f"data.root={data_root}", f"data.resolution={case.resolution}", f"train.batch_size={case.batch}",
               f"train.total_steps={case.steps}", f"checkpoint.dir={run_dir}", f"checkpoint.every={case.steps}",
               "train.warmup_steps=0", "log.progress=false", f"data.num_workers={workers}", *case.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"not done within {timeout_s:.0f} s (the script's deadline)") from err
    if result.returncode:
        print(result.stderr[-1500:], file=sys.stderr, flush=True)
        raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    steady = read_metrics(run_dir)[case.warmup:]
    step_s = statistics.median(case.batch / m["images_per_s"] for m in steady)
    return {"steps_s": 1 / step_s, "images_s": case.batch / step_s,
            "wait": statistics.mean(m["data_wait_frac"] for m in steady), "timed": len(steady)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, the tiny case only, 6 steps")
    parser.add_argument("--encoders", help="folders written by `encoders.py --save DIR` (vae, gemma, bert, clip)")
    parser.add_argument("--resolution", type=int, default=256, help="of the mid-300m cases")
    parser.add_argument("--batch", type=int, default=16, help="of the mid-300m cases")
    parser.add_argument("--steps", type=int, default=60, help="of the mid-300m cases")
    parser.add_argument("--images", type=int, default=768, help="demo images at the mid-300m resolution")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader decode workers (data.num_workers)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--deadline-s", type=float, default=600,
                        help="stop starting cases, and end a running one, this many seconds after the start")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a CPU")

    deadline = time.monotonic() + args.deadline_s
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    print(f"\n### Colocated training on {device}, torch {torch.__version__}, "
          f"{'compiled' if args.compile else 'eager'}, bf16 autocast on GPU\n")
    print("| case | resolution | batch | steps/s | images/s | data wait | steps timed | mean image |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = {}
        for i, case in enumerate(cases(args)):
            try:
                if case.resolution not in data and deadline - time.monotonic() > MIN_CASE_S:
                    images = 48 if args.smoke else (256 if case.resolution == 64 else args.images)
                    data[case.resolution] = build_demo_dataset(tmp / f"data{case.resolution}", n=images,
                                                               resolution=case.resolution)
                left = deadline - time.monotonic()  # after the data, which takes seconds to draw at 256 px
                if left < MIN_CASE_S:
                    raise Skipped(f"skipped: {max(left, 0):.0f} s left of --deadline-s {args.deadline_s:.0f}")
                r = run_case(case, data[case.resolution], tmp / f"run{i}", args.compile, 1 if args.smoke else args.workers,
                             left)
                side = trained_side(data[case.resolution], case.resolution, case.batch)
                figures = (f"{r['steps_s']:.2f} | {r['images_s']:.0f} | {100 * r['wait']:.1f}% | {r['timed']} | "
                           f"{side:.0f}² px")
            except Exception as err:  # noqa: BLE001 - one failing case (out of memory, say) must not hide the others
                figures = f"{'' if isinstance(err, Skipped) else 'failed: '}{str(err).splitlines()[0][:120]} | | | | "
            print(f"| {case.name} | {case.resolution} | {case.batch} | {figures} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
