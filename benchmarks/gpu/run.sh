#!/usr/bin/env bash
# The project's GPU check: one script, under 8 minutes on one H100/H200, printing markdown tables to
# paste into docs/benchmarks.md with the card's name.
#   bash benchmarks/gpu/run.sh              model step (MFU, profile), encoders, colocated training
#   bash benchmarks/gpu/run.sh recaption    the recaptioning throughput instead (about 2 minutes)
# From the repository root; flash-attn and vLLM are used when installed. Each part has its own time limit,
# and the rows that matter most come first within each, so a cut-short part still reports.
set -u
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "${1:-}" = recaption ]; then
  timeout 150 python benchmarks/gpu/recaption.py || echo "recaption.py failed or timed out"
  exit 0
fi
encoders=$(mktemp -d)
trap 'rm -rf "$encoders"' EXIT
timeout 250 python benchmarks/gpu/model_step.py || echo "model_step.py failed or timed out"
timeout 90 python benchmarks/gpu/encoders.py --save "$encoders" || echo "encoders.py failed or timed out"
timeout 130 python benchmarks/gpu/colocated.py --encoders "$encoders" || echo "colocated.py failed or timed out"
