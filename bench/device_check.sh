#!/usr/bin/env bash
# One accelerator check (bench/device_check.py): train-step throughput of
# the plain, DSP group and DDROP steps and pruned-vs-dense inference latency,
# one table at the end. No network: every input is generated.
#
#   bash bench/device_check.sh              # one GPU, under 8 minutes
#   bash bench/device_check.sh --cpu-smoke  # tiny sizes on CPU, seconds
#
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
# XLA's default would take most of the GPU's memory up front, leaving none
# for torch and onnxruntime, which run in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec "${PYTHON:-python}" bench/device_check.py "$@"
