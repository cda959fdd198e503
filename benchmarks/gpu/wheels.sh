#!/usr/bin/env bash
# Wheels of what benchmarks/gpu/ imports and the GPU machine's image lacks (its Python 3.12 has torch,
# transformers, pyarrow, safetensors, pyyaml, ...; not diffusers or polars), into .whl/ (git-ignored).
# Run here, where PyPI is reachable; the device call then carries .whl and run.sh installs it:
#   bash benchmarks/gpu/wheels.sh    # about 60 MB; the versions this checkout's .venv has
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
rm -rf .whl
# Only what the image lacks: a carried package shadows the image's copy, and its own dependencies are not carried.
download -d .whl "diffusers==$(version diffusers)" "polars==$(version polars)" "polars-runtime-32==$(version polars-runtime-32)"
# run.sh falls back to this diffusers when the one above does not import beside the image's huggingface_hub
# (it wants hub >= 1.32; 0.39 takes >= 0.34 and runs this project's code).
download -d .whl/fallback "diffusers==0.39.0"
du -sh .whl
