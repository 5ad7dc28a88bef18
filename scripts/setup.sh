#!/usr/bin/env bash
# Sets up everything ferroscan needs on a fresh machine, idempotently:
# a virtual environment in .venv with the Python dependencies (PyTorch, NVRTC from PyPI, test and
# plot tools) and ferroscan itself built from this checkout (Rust core + PyO3 extension).
# Needs: Python >= 3.9 with venv, a Rust toolchain (cargo) with rustfmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FERROSCAN_VENV:-.venv}
REQUIREMENTS=(
  "maturin>=1.16,<1.17"
  "torch>=2.4"
  "numpy"
  "pytest"
  "hypothesis"
  "ruff"
  "matplotlib"
  "tqdm"
  "nvidia-cuda-nvrtc==13.0.88"
)

command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust from rustup.rs" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.ferroscan-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${REQUIREMENTS[*]}" ]; then
  echo "setup: installing Python dependencies (PyTorch is a large download; a few minutes)"
  "$VENV/bin/python" -m pip install --progress-bar off -q "${REQUIREMENTS[@]}"
  echo "${REQUIREMENTS[*]}" > "$stamp"
fi
echo "setup: building ferroscan (release)"
log="$VENV/.ferroscan-build.log"
if ! VIRTUAL_ENV="$(cd "$VENV" && pwd)" "$VENV/bin/maturin" develop --release -q >"$log" 2>&1; then
  cat "$log" >&2
  echo "setup: the build failed (log above)" >&2
  exit 1
fi
"$VENV/bin/python" -c "import ferroscan; print('setup: ferroscan', ferroscan.__version__, 'ready')"
