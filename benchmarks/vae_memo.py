"""What the loader's VAE memo (data.vae_memo_mb, trainer/vae_memo.py) saves in the CPU demo (configs/train/demo.yaml).

1. The loader's pipeline in this process on 1 thread (a Feeder with data.num_workers=0, so decoding counts
   too): CPU seconds a batch of 24 images, memo off against on, in the first epoch and after it.
2. The demo's training itself (torchrun, 1 loader : 3 model ranks, gloo) for --steps steps, memo off
   against on: wall seconds and the CPU seconds of all its processes, and images/s from step 60 on (past
   start-up and the memo's first epoch, metrics.jsonl).

    .venv/bin/python benchmarks/vae_memo.py                 # ~4 minutes on a 2-core box
    .venv/bin/python benchmarks/vae_memo.py --steps 400 --images 360
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import load_train_config
from trainer.data import open_index
from trainer.feeder import Feeder
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the demo data builder lives with the tests
from tests.trainer.demo_dataset import build_demo_dataset  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "train" / "demo.yaml"
DEMO = load_train_config(DEMO_CONFIG)
MODEL_RANKS = len(DEMO.topology.loader_to_model[0])
STEADY_FROM = 60


def loader_cpu_per_batch(data_root: Path, memo_mb: float, epochs: int) -> tuple[float, float]:
    """CPU seconds a batch of the loader's pipeline: (first epoch, the epochs after it)."""
    cfg = load_train_config(DEMO_CONFIG, [f"data.root={data_root}", f"data.vae_memo_mb={memo_mb}", "data.num_workers=0"])
    feeder = Feeder(cfg, open_index(data_root, cfg.data.resolution), MODEL_RANKS, 0, 1, torch.device("cpu"))
    per_epoch = feeder.sampler.batches_per_epoch
    batches = feeder.chunks(per_epoch * epochs, lambda step, snapshot: None)
    seconds = []
    for _ in range(per_epoch * epochs):
        start = time.process_time()
        next(batches)
        seconds.append(time.process_time() - start)
    later = seconds[per_epoch:]
    return sum(seconds[:per_epoch]) / per_epoch, sum(later) / len(later)


def training(data_root: Path, run_dir: Path, steps: int, memo_mb: float) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of every process, images/s from STEADY_FROM) of a demo run of ``steps`` steps."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={MODEL_RANKS + 1}",
               str(REPO / "trainer" / "train.py"), "--config", str(DEMO_CONFIG), f"data.root={data_root}",
               f"checkpoint.dir={run_dir}", f"train.total_steps={steps}", f"checkpoint.every={steps}",
               f"data.vae_memo_mb={memo_mb}", "log.progress=false"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        raise SystemExit(f"run failed:\n{result.stderr[-4000:]}")
    steady = statistics.mean(m["images_per_s"] for m in read_metrics(run_dir)[STEADY_FROM:])
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=360, help="demo images to build (the learning test's 360)")
    parser.add_argument("--epochs", type=int, default=3, help="loader epochs in part 1")
    parser.add_argument("--steps", type=int, default=200, help="training steps in part 2")
    parser.add_argument("--memo-mb", type=float, default=DEMO.data.vae_memo_mb or 64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = build_demo_dataset(tmp / "data", n=args.images, resolution=DEMO.data.resolution)
        off_first, off_later = loader_cpu_per_batch(data_root, 0, args.epochs)
        on_first, on_later = loader_cpu_per_batch(data_root, args.memo_mb, args.epochs)
        print(f"1. loader CPU s a batch of {MODEL_RANKS * DEMO.train.batch_size} images, {args.images} images, "
              f"{args.epochs} epochs, 1 thread")
        print(f"{'':<16}{'memo off':>10}{'memo on':>10}{'off / on':>10}")
        print(f"{'first epoch':<16}{off_first:>10.4f}{on_first:>10.4f}{off_first / on_first:>10.2f}")
        print(f"{'later epochs':<16}{off_later:>10.4f}{on_later:>10.4f}{off_later / on_later:>10.2f}")
        runs = {memo: training(data_root, tmp / f"run-{memo}", args.steps, memo) for memo in (0, args.memo_mb)}
    (off_wall, off_cpu, off_rate), (on_wall, on_cpu, on_rate) = runs[0], runs[args.memo_mb]
    print(f"2. demo training, {args.steps} steps, 1 loader : {MODEL_RANKS} model ranks, every process's CPU")
    print(f"{'':<16}{'memo off':>10}{'memo on':>10}{'off / on':>10}")
    print(f"{'wall s':<16}{off_wall:>10.1f}{on_wall:>10.1f}{off_wall / on_wall:>10.2f}")
    print(f"{'CPU s':<16}{off_cpu:>10.1f}{on_cpu:>10.1f}{off_cpu / on_cpu:>10.2f}")
    print(f"{f'images/s, {STEADY_FROM}+':<16}{off_rate:>10.1f}{on_rate:>10.1f}{on_rate / off_rate:>10.2f} (on / off)")


if __name__ == "__main__":
    main()
