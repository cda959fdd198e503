"""The GPU encoder benchmark cannot run here; its --smoke mode proves the script itself works."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "encoders.py"


def test_encoders_benchmark_smoke_prints_its_table_and_keeps_the_folders_when_asked(tmp_path):
    command = [sys.executable, str(SCRIPT), "--smoke", "--save", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed:" not in result.stdout, result.stdout  # each row catches its error, so the test must look
    assert "| encode_text (length-grouped chunks), 4 loader captions |" in result.stdout
    assert "| all padded to 77 in one batch (before), 4 loader captions |" in result.stdout
    assert "| encode_images 64 px, batch 2 |" in result.stdout
    # what benchmarks/gpu/colocated.py --encoders reads: each folder loadable on its own
    for name in ("vae", "gemma", "bert", "clip"):
        assert (tmp_path / name / "config.json").is_file()
