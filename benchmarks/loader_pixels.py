"""What the loader's decode workers hand over: uint8 pixels vs float32 in [-1, 1].

``BucketBatches`` returns uint8 (B, 3, H, W) and the feeder converts to float32 on the encoders' device
(``trainer.data.to_unit_range``); before, every worker converted to float32 and handed over four times
the bytes through shared memory (and, on a GPU, through the host-to-device copy). The baseline is that
old behaviour, rebuilt here as a subclass that converts in the worker. Both run through a real
DataLoader with worker processes over the same shards (photo-like PNGs, ``etl.buckets.write_bucketed``,
``shuffle: row_groups``), alternating run by run, and both end with float32 batches in the loader
process, as the encoders get them on a CPU.

"CPU ms per image" is the CPU time of the loader process and its workers together (the workers' from
``RUSAGE_CHILDREN`` once they have exited); "wall ms per image" is the loader's time to get every batch
as float32.

    .venv/bin/python benchmarks/loader_pixels.py                    # 512 and 1024 px, a few minutes
    .venv/bin/python benchmarks/loader_pixels.py --resolutions 256 --batch-size 64
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.data import DataLoader

from benchmarks.shuffle_reads import write_bucket
from etl.index import build_index
from trainer.data import BucketBatches, BucketSampler, to_unit_range


class FloatInWorker(BucketBatches):
    """The old handoff: each worker converts its batch to float32 in [-1, 1] before handing it over."""

    def __getitem__(self, rows) -> dict:
        item = super().__getitem__(rows)
        return {**item, "images": to_unit_range(item["images"])}


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(dataset: BucketBatches, index, batch: int, batches: int, workers: int) -> tuple[float, float, int]:
    """(wall s, CPU s, bytes handed over per batch) to get ``batches`` float32 batches."""
    sampler = BucketSampler(index, batch, seed=3, shuffle="row_groups")
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, prefetch_factor=2)
    cpu, started = cpu_seconds(), time.perf_counter()
    handed = 0
    for i, item in enumerate(loader):
        handed = item["images"].nbytes
        images = item["images"] if item["images"].is_floating_point() else to_unit_range(item["images"])
        assert images.dtype == torch.float32
        if i + 1 == batches:
            break
    wall = time.perf_counter() - started
    del loader  # its workers exit, so their CPU time reaches RUSAGE_CHILDREN
    return wall, cpu_seconds() - cpu, handed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loader's own conversion on one core, as each worker's
    print("| R | batch | handoff | MiB handed over per batch | wall ms per image | CPU ms per image |")
    print("|---|---:|---|---:|---:|---:|")
    for resolution in args.resolutions:
        with tempfile.TemporaryDirectory() as tmp:
            paths, _ = write_bucket(Path(tmp), resolution, 4 * args.batches * args.batch_size)
            index = build_index(paths)
            datasets = {"float32 from workers (before)": FloatInWorker(tmp, resolution, index, 0.5, 0),
                        "uint8 from workers (now)": BucketBatches(tmp, resolution, index, 0.5, 0)}
            for path in paths:
                path.read_bytes()  # into the page cache
            best = {name: (float("inf"), float("inf"), 0) for name in datasets}
            for _ in range(args.repeats):  # alternating; the least disturbed run of each
                for name, dataset in datasets.items():
                    wall, cpu, handed = run(dataset, index, args.batch_size, args.batches, args.workers)
                    best[name] = (min(best[name][0], wall), min(best[name][1], cpu), handed)
        images = args.batches * args.batch_size
        base = best["float32 from workers (before)"]
        for name, (wall, cpu, handed) in best.items():
            print(f"| {resolution} | {args.batch_size} | {name} | {handed / 2**20:.1f} | {wall / images * 1e3:.2f} "
                  f"({base[0] / wall:.2f}x) | {cpu / images * 1e3:.2f} ({base[1] / cpu:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
