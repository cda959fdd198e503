"""data_wait_frac (the share of each step the model ranks wait for data) in the CPU demo configuration,
and with a deliberately slow loader, to show that prefetching hides a fast enough loader and that the
metric reports real waiting when the loader is the bottleneck.

Each case is a real 4-process run (1 loader : 3 model ranks, gloo) of configs/train/demo.yaml on the demo
data set at its resolution (64 px), launched with torchrun from this script. The slow loader sleeps in the feeder
(env SD3_BENCH_LOADER_SLEEP_S, a benchmark knob read by trainer/feeder.py). For the slow cases the
expected fraction follows from the fast case: when the loader is the bottleneck a step lasts one loader
period, of which the model ranks compute for the fast case's compute time and wait for the rest:
expected = 1 - compute_fast / step_slow.

    .venv/bin/python benchmarks/data_wait.py                        # ~4 minutes on a 2-core box
    .venv/bin/python benchmarks/data_wait.py --steps 60 --sleep 0.5 1.0 --images 480
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.config import load_train_config
from trainer.feeder import SLOW_LOADER_ENV
from trainer.loop import images_per_step
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the demo data builder lives with the tests
from tests.trainer.demo_dataset import build_demo_dataset  # noqa: E402

WARMUP_STEPS = 8  # the first steps include process start, the decode worker filling up and the first sends
DEMO_CONFIG = REPO / "configs" / "train" / "demo.yaml"
DEMO = load_train_config(DEMO_CONFIG)
IMAGES_PER_STEP = images_per_step(DEMO, num_model_ranks=len(DEMO.topology.loader_to_model[0]))


def run_case(data_root: Path, run_dir: Path, steps: int, prefetch: int, sleep_s: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
               str(REPO / "trainer" / "train.py"), "--config", str(DEMO_CONFIG),
               f"data.root={data_root}", f"checkpoint.dir={run_dir}", f"train.total_steps={steps}",
               f"checkpoint.every={steps}", f"topology.prefetch={prefetch}", "log.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", SLOW_LOADER_ENV: str(sleep_s)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"run failed:\n{result.stderr[-4000:]}")
    steady = read_metrics(run_dir)[WARMUP_STEPS:]
    step_s = statistics.mean(IMAGES_PER_STEP / m["images_per_s"] for m in steady)
    wait = statistics.mean(m["data_wait_frac"] for m in steady)
    return {"step_s": step_s, "wait_frac": wait, "compute_s": step_s * (1 - wait)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--images", type=int, default=240, help="demo images to build")
    parser.add_argument("--sleep", type=float, nargs="+", default=[1.0], help="slow-loader sleeps per batch (s)")
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = build_demo_dataset(tmp / "data", n=args.images, resolution=DEMO.data.resolution)
        cases = [("demo loader", 0.0)] + [(f"loader +{s:g} s/batch", s) for s in args.sleep]
        results = {}
        for i, (name, sleep_s) in enumerate(cases):
            results[name] = run_case(data_root, tmp / f"run{i}", args.steps, args.prefetch, sleep_s)
    fast = results["demo loader"]
    print(f"steps {args.steps} (first {WARMUP_STEPS} excluded), prefetch {args.prefetch}, 1 loader : 3 model ranks")
    print(f"{'case':<22}{'step s':>9}{'data_wait_frac':>16}{'expected':>10}{'step / demo':>13}")
    for name, r in results.items():
        expected = max(0.0, 1 - fast["compute_s"] / r["step_s"]) if name != "demo loader" else float("nan")
        print(f"{name:<22}{r['step_s']:>9.3f}{r['wait_frac']:>16.3f}{expected:>10.3f}{r['step_s'] / fast['step_s']:>13.2f}")


if __name__ == "__main__":
    main()
