#!/usr/bin/env bash
# The whole GPU benchmark report in one command, writing results.json, report.md and the
# plots to OUT_DIR (on an H200 it stops measuring after 6 minutes and lists what it skipped):
#
#   bash bench/gpu_report.sh OUT_DIR
#
# It builds the CUDA kernels ahead of time with the machine's python3 (torch with CUDA, nvcc),
# installs any wheels found in .whl/ (e.g. liger_kernel, carried to a machine with no
# registry), then runs `python3 -m bench --device cuda`.
set -euo pipefail
out=${1:?usage: bash bench/gpu_report.sh OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
python3 -m pip install -q --no-build-isolation --no-deps -e .
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps .whl/*.whl
fi
python3 -m bench --device cuda --out "$out" --deadline 360
