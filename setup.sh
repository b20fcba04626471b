#!/usr/bin/env bash
# One-step set-up: a virtual environment at .venv with the project and its test tools.
# torch is installed first and pinned, so pip never swaps in a different (multi-GB) build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# TORCH_INDEX_URL picks the build: e.g. https://download.pytorch.org/whl/cpu for the CPU-only wheel on a
# machine whose index serves PyPI's default Linux build (CUDA, several GB). Unset: pip's configured index.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
  ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "set-up done: $(.venv/bin/ponder --help >/dev/null && echo 'ponder is at .venv/bin/ponder')"
