#!/usr/bin/env bash
# The main job: set up, then scan on CUDA if a GPU is present (else the CPU), check the answer
# against a float64 reference and print throughput. Arguments go to `python -m ferroscan.demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${FERROSCAN_VENV:-.venv}/bin/python" -m ferroscan.demo "$@"
