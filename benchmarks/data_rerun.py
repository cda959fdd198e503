"""`sd3 data run` run again: every stage forced (what every rerun did before) vs skipping what is up to date.

The demo pipeline's settings (configs/data/demo.yaml: 250-row shards, one 64 px resolution, alt-text
captions) on a generated source served over loopback, in a fresh Dagster home. Times, one after the other
in this process: the first run; a rerun with nothing changed, forced and incremental; then the URL list
grown by one shard's rows, forced (every shard again), and grown by one more, incremental. Each run's
line on stderr says how many partitions each stage ran.

    .venv/bin/python benchmarks/data_rerun.py                 # 1000 images, then 1250
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etl.demo_source import make_demo_source  # noqa: E402
from etl.serve import serve_directory  # noqa: E402
from orchestration.run import run_pipeline  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "data" / "demo.yaml"


def timed(config: Path, force: bool) -> float:
    lines = []
    start = time.perf_counter()
    assert run_pipeline(config, log=lines.append, force=force).balanced
    seconds = time.perf_counter() - start
    print(f"{'forced' if force else 'incremental'}, {seconds:.1f} s: " + "; ".join(
        line.split("] ", 1)[1] for line in lines), file=sys.stderr)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        home, source = tmp / "home", tmp / "source"
        home.mkdir()
        source.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = str(home)
        settings = yaml.safe_load(DEMO_CONFIG.read_text())
        with serve_directory(source) as base_url:
            shard = settings["shard_size"]
            every_row = pq.read_table(make_demo_source(source, args.images + 2 * shard, base_url))
            url_list = tmp / "urls.parquet"

            def list_rows(count: int) -> None:  # the URL list grows by rows appended at its end
                pq.write_table(every_row.slice(0, count), url_list)

            list_rows(args.images)
            settings.update(root=str(tmp / "pipeline"))
            settings["sources"][0]["path"] = str(url_list)
            config = tmp / "pipeline.yaml"
            config.write_text(yaml.safe_dump(settings))
            rows = [("first run", timed(config, force=False), None)]
            forced, incremental = timed(config, force=True), timed(config, force=False)
            rows.append(("nothing changed", forced, incremental))
            list_rows(args.images + shard)
            forced = timed(config, force=True)
            list_rows(args.images + 2 * shard)
            rows.append(("one new shard", forced, timed(config, force=False)))

    print(f"{args.images} demo images, shards of {settings['shard_size']}, concurrency {settings['concurrency']}")
    print(f"{'case':>16} {'forced (s)':>11} {'incremental (s)':>16} {'ratio':>7}")
    for case, forced, incremental in rows:
        if incremental is None:
            print(f"{case:>16} {forced:>11.1f}")
        else:
            print(f"{case:>16} {forced:>11.1f} {incremental:>16.1f} {forced / incremental:>6.1f}x")


if __name__ == "__main__":
    main()
