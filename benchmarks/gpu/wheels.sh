#!/usr/bin/env bash
# Wheels of what benchmarks/gpu/ imports and the GPU machine's image lacks (its Python 3.12 has torch,
# transformers, pyarrow, safetensors, pyyaml, ...; not diffusers or polars), into .whl/ (git-ignored).
# Run here, where PyPI is reachable; the device call then carries .whl and run.sh installs it:
#   bash benchmarks/gpu/wheels.sh    # about 60 MB; the versions this checkout's .venv has
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$(version diffusers)" "polars==$(version polars)" "polars-runtime-32==$(version polars-runtime-32)" \
  "importlib_metadata==$(version importlib_metadata)"
du -sh .whl
