#!/usr/bin/env bash
# The project's GPU check: one script, under 8 minutes on one H100/H200, printing markdown tables to
# paste into docs/benchmarks.md with the card's name.
#   bash benchmarks/gpu/run.sh              model step (MFU, profile), encoders, colocated training
#   bash benchmarks/gpu/run.sh recaption    the recaptioning throughput instead (about 2 minutes)
#   bash benchmarks/gpu/run.sh smoke        every part's --smoke mode on the CPU: checks this script
# From the repository root; flash-attn and vLLM are used when installed. On a machine without diffusers
# or polars, first run `bash benchmarks/gpu/wheels.sh` where PyPI is reachable and bring .whl/ along:
# this installs it. Each part has its own time limit and prints each row as it is measured, the rows
# that matter most first, so a part cut short still reports. Each part's tables and its stderr are also
# written to $OUT (or a temp folder) as <part>.md and <part>.err.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
PY=${PYTHON:-python3}
RESULTS=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site "$@"; }
if compgen -G ".whl/*.whl" > /dev/null; then
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}  # also for the fallback, should this install fail
  install .whl/*.whl
  if ! "$PY" -c "from diffusers import AutoencoderKL, ModelMixin" 2> /dev/null && compgen -G ".whl/fallback/*.whl" > /dev/null; then
    echo "the carried diffusers does not import beside this image's packages: its fallback, $(ls .whl/fallback)"
    rm -rf /tmp/gpu-site/diffusers /tmp/gpu-site/diffusers-*.dist-info
    install .whl/fallback/*.whl
  fi
fi
MODE=${1:-all}
SMOKE=$([ "$MODE" = smoke ] && echo --smoke || true)
# A missing package would otherwise cost every part its whole time limit, one import error at a time.
"$PY" -c "import sys, torch, diffusers, polars, transformers, safetensors, pyarrow, yaml
assert sys.argv[1] == 'smoke' or torch.cuda.is_available(), 'torch sees no CUDA device'" "$MODE" \
  || { echo "not ready: see the error above (missing packages: bash benchmarks/gpu/wheels.sh, carry .whl)"; exit 1; }

# part NAME SECONDS SCRIPT ARGS...: run one script under a hard limit, its tables on stdout as they come.
part() {
  local name=$1 limit=$2
  shift 2
  timeout -k 5 "$limit" "$PY" "$@" 2> "$RESULTS/$name.err" | tee "$RESULTS/$name.md"
  local status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "$name: exit $status$([ "$status" = 124 ] && echo " (its $limit s limit)"); last lines of its stderr:"
    tail -n 8 "$RESULTS/$name.err"
  fi
}

if [ "$MODE" = recaption ]; then
  part recaption 150 benchmarks/gpu/recaption.py
  exit 0
fi
encoders=$(mktemp -d)
trap 'rm -rf "$encoders"' EXIT
# 210 + 75 + 145 s: with the install and start-up, under 8 minutes. The colocated part draws its 256 px data,
# starts three trainers and writes a 5 GB checkpoint of each mid-size case.
part model_step 210 benchmarks/gpu/model_step.py --deadline-s 172 $SMOKE
part encoders 75 benchmarks/gpu/encoders.py --save "$encoders" $SMOKE
part colocated 145 benchmarks/gpu/colocated.py $([ -z "$SMOKE" ] && echo --encoders "$encoders") --deadline-s 135 $SMOKE
