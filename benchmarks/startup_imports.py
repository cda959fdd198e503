"""Process start-up: the seconds a fresh interpreter takes to import what each trainer role needs, against
the imports a model rank made before the encoders' libraries were imported on use (the baseline: the same
`import trainer.train` plus diffusers' AutoencoderKL and the transformers models, as it was eager).

Every torchrun launch pays this once per process, all processes at once, so on a small box start-up is
bounded by cores: the CPU demo starts 4 processes on 2 cores.

    .venv/bin/python benchmarks/startup_imports.py
    .venv/bin/python benchmarks/startup_imports.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EAGER_ENCODER_IMPORTS = ("from diffusers import AutoencoderKL; from transformers import AutoModel, AutoTokenizer, "
                         "CLIPTextModelWithProjection, Gemma2Model, ModernBertModel; import trainer.tokenizer")
# A loader rank builds the encoders, so it imports the baseline's set, before and now.
ROLES = {
    "model rank (before: encoder libraries eager)": f"import trainer.train; {EAGER_ENCODER_IMPORTS}",
    "model rank (now)": "import trainer.train",
}


def import_seconds(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per role, interleaved")
    args = parser.parse_args()
    import_seconds("import trainer.train")  # warm the file cache and the bytecode of every module
    times: dict[str, list[float]] = {role: [] for role in ROLES}
    for _ in range(args.repeats):
        for role, statement in ROLES.items():
            times[role].append(import_seconds(statement))
    before = statistics.median(times["model rank (before: encoder libraries eager)"])
    print(f"{'role':48}{'median s':>10}{'min s':>8}{'vs before':>11}")
    for role, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{role:48}{median:>10.2f}{min(seconds):>8.2f}{before / median:>10.2f}x")


if __name__ == "__main__":
    main()
