"""The colocated GPU benchmark cannot run here; its --smoke mode trains the tiny case for real on the CPU."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "colocated.py"


def test_colocated_benchmark_smoke_trains_and_reports_a_row():
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| tiny |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:3] == ["64", "2"] and float(cells[3]) > 0 and cells[6] == "4"  # 6 steps, the first 2 left out
    assert 0.0 <= float(cells[5].rstrip("%")) <= 100.0
    side = int(cells[7].removesuffix("² px"))
    assert 16 <= side <= 64  # the demo's buckets: 64 px on the long side, less on the short one


def test_colocated_benchmark_past_its_deadline_skips_the_case_and_says_so():
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--deadline-s", "1"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| tiny | 64 | 2 | skipped: 1 s left of --deadline-s 1 |" in result.stdout
