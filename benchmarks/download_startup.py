"""A shard's download: img2dataset's processes as etl/img2dataset_child.py starts them (torch hidden from
webdataset, the modules for options a download never sets imported only on use) against the interpreters
as they were before (the baseline: the same child script less those lines), and with torch hidden only.

Every shard of every `sd3 data run` starts three interpreters (img2dataset's own, its logger, one worker
per download process), each importing img2dataset; this measures what that start-up costs per shard, in
wall seconds and in CPU seconds of the whole process tree, interleaved in this process. Images are
generated demo shapes served over loopback, so the network costs next to nothing and start-up is most of
what is left.

    .venv/bin/python benchmarks/download_startup.py                        # 8 and 250 rows (the demo's shards)
    .venv/bin/python benchmarks/download_startup.py --rows 8 --repeats 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import etl.download  # noqa: E402
from etl.config import DownloadConfig, SourceConfig  # noqa: E402
from etl.demo_source import make_demo_source  # noqa: E402
from etl.serve import serve_directory  # noqa: E402
from etl.sources import read_url_list, shard_url_list  # noqa: E402

CHILD = etl.download._IMG2DATASET_CHILD
HIDING_TORCH = 'sys.modules["torch"] = None\n'
IMPORTING_ON_USE = 'for _name in ("wandb", "albumentations", "pandas"):\n    sys.modules[_name] = ImportedOnUse(_name)\n'


def child_less(folder: Path, name: str, *lines: str) -> Path:
    """The child script less ``lines``."""
    source = CHILD.read_text()
    for line in lines:
        assert line in source, line
        source = source.replace(line, "")
    path = folder / f"img2dataset_child_{name}.py"
    path.write_text(source)
    return path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_download(child: Path, urls, work_dir: Path, cfg: DownloadConfig) -> tuple[float, float]:
    """(wall s, CPU s of the download's process tree) for one shard, img2dataset started by ``child``."""
    etl.download._IMG2DATASET_CHILD = child
    cpu, start = children_cpu_s(), time.perf_counter()
    result = etl.download.download_shard(urls, work_dir, cfg)
    wall = time.perf_counter() - start
    assert result.kept.num_rows == urls.num_rows, result.rejects.to_pylist()
    return wall, children_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 250])
    parser.add_argument("--repeats", type=int, default=3, help="downloads per variant and size, interleaved")
    args = parser.parse_args()
    cfg = DownloadConfig(processes=1, threads=8, timeout=10, retries=0)
    with tempfile.TemporaryDirectory() as tmp, serve_directory(Path(tmp)) as base_url:
        tmp = Path(tmp)
        variants = {"baseline": child_less(tmp, "baseline", HIDING_TORCH, IMPORTING_ON_USE),
                    "torch hidden": child_less(tmp, "torch_hidden", IMPORTING_ON_USE),
                    "now (+ imports on use)": CHILD}
        source = SourceConfig(name="demo", path=make_demo_source(tmp, max(args.rows), base_url))
        ((_, every_row),) = shard_url_list(read_url_list(source), source.name, max(args.rows))
        print(f"{'rows':>5}  {'variant':28}{'wall s':>8}{'CPU s':>8}{'wall vs baseline':>18}")
        for rows in args.rows:
            urls = every_row.slice(0, rows)
            times = {name: [] for name in variants}
            for repeat in range(args.repeats):
                for name, child in variants.items():
                    work_dir = tmp / f"work-{rows}-{repeat}-{name[:3]}"
                    times[name].append(timed_download(child, urls, work_dir, cfg))
            baseline_wall = statistics.median(w for w, _ in times["baseline"])
            for name, samples in times.items():
                wall = statistics.median(w for w, _ in samples)
                cpu = statistics.median(c for _, c in samples)
                print(f"{rows:>5}  {name:28}{wall:>8.2f}{cpu:>8.2f}{baseline_wall / wall:>17.2f}x")


if __name__ == "__main__":
    main()
