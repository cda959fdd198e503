#!/usr/bin/env bash
# The project's GPU check: one script, under 8 minutes on one H100/H200, printing markdown tables to
# paste into docs/benchmarks.md with the card's name.
#   bash benchmarks/gpu/run.sh            (from the repository root; flash-attn and vLLM used when installed)
set -u
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 python benchmarks/gpu/model_step.py || echo "model_step.py failed or timed out"
timeout 90 python benchmarks/gpu/encoders.py || echo "encoders.py failed or timed out"
timeout 120 python benchmarks/gpu/recaption.py || echo "recaption.py failed or timed out"
