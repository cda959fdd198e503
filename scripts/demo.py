"""`make demo`: the whole chain on this machine, offline.

Generates the coloured-shapes source, serves it on 127.0.0.1, and runs the Dagster data pipeline on it
(img2dataset download -> filter -> recaption -> buckets -> index). Runs land in ./.dagster, so
`make ui` afterwards shows their lineage.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from etl.demo_source import make_demo_source  # noqa: E402
from etl.serve import serve_directory  # noqa: E402
from orchestration.cli import dagster_home  # noqa: E402
from orchestration.run import run_pipeline  # noqa: E402

SOURCE = REPO / "demo_data" / "source"
CONFIG = REPO / "configs" / "data" / "demo.yaml"
PORT = int(os.environ.get("SD3_DEMO_PORT", "8765"))
IMAGES = int(os.environ.get("SD3_DEMO_IMAGES", "1000"))


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    os.chdir(REPO)
    home = dagster_home()
    if not port_is_free(PORT):
        print(f"port {PORT} is taken; set SD3_DEMO_PORT to a free port", file=sys.stderr)
        return 1
    start = time.perf_counter()
    print(f"[1/2] demo source: {IMAGES} coloured shapes -> {SOURCE}")
    make_demo_source(SOURCE, IMAGES, f"http://127.0.0.1:{PORT}", seed=0)
    print(f"[2/2] data pipeline ({CONFIG.relative_to(REPO)}) over http://127.0.0.1:{PORT}")
    with serve_directory(SOURCE, port=PORT):
        report = run_pipeline(CONFIG)
    print(report.table())
    print(f"\ndone in {time.perf_counter() - start:.0f} s. Buckets and index: demo_data/pipeline/")
    print(f"lineage UI: `make ui` (DAGSTER_HOME={home}), then open http://127.0.0.1:3000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
