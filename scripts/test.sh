#!/usr/bin/env bash
# Runs every test: Rust format/lint/unit+property tests, the NVRTC compile test of every kernel
# variant, Python lint, and pytest (CPU always; CUDA tests too when a GPU is present).
# Extra arguments go to pytest (e.g. `scripts/test.sh -m cuda`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FERROSCAN_VENV:-.venv}
export FERROSCAN_PYTHON="$PWD/$VENV/bin/python"   # where the Rust tests look for the NVRTC wheel

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== NVRTC compiles every kernel variant (sm_80, sm_90)"
cargo test -p ferroscan --test kernels_compile -- --ignored
echo "== ruff"
"$VENV/bin/ruff" check python tests examples
echo "== pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
