#!/usr/bin/env bash
# One-shot GPU acceptance run on a machine with one NVIDIA GPU, PyTorch and Triton installed, and no network:
#   bench/gpu_check.sh OUT_DIR [--quick]
# Installs this checkout (pip --no-deps --no-build-isolation --no-index -e .), runs the GPU and Triton tests, the
# kd_loss and training benchmarks, and writes OUT_DIR/gpu_check.json + gpu_check.log. Exit status 0 = all passed.
# See bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_check.py "$@"
