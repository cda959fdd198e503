"""benchmarks/gpu/run.sh is what a one-shot GPU session runs: its smoke mode runs every part on the CPU
through the same wrapper (limits, tables on stdout and in $OUT), so a mistake in the script shows here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu" / "run.sh"


def run_script(mode: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), mode], capture_output=True, text=True, timeout=600, env=env)


def test_smoke_mode_runs_every_part_and_keeps_each_table_in_out(tmp_path):
    result = run_script("smoke", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tables = {part: (tmp_path / f"{part}.md").read_text() for part in ("model_step", "encoders", "colocated")}
    assert "| 64 | 2 | sdpa |" in tables["model_step"]
    assert "| encode_images 64 px, batch 2 |" in tables["encoders"]
    assert "| tiny | 64 | 2 |" in tables["colocated"]
    for part, table in tables.items():
        assert "failed" not in table and "skipped" not in table, (part, table)
        assert table in result.stdout  # shown as it comes, not only kept
    assert not any(f"{part}: exit" in result.stdout for part in tables)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_stops_before_any_part(tmp_path):
    result = run_script("all", tmp_path)
    assert result.returncode == 1 and "torch sees no CUDA device" in result.stderr
    assert "not ready" in result.stdout and not list(tmp_path.glob("*.md"))
