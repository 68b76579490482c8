#!/usr/bin/env bash
# Sets up DualFocus Rig in ./.venv and runs the simulated rig once (no hardware, no GPU).
#   ./setup.sh            set up, then run: python run_rig.py --config configs/sim.yaml
#   ./setup.sh --no-run   set up only
# Which torch build: a CPU build is installed unless torch is already in .venv.
#   TORCH_SPEC='torch==2.13.0' (default) and, for another wheel index (for example
#   PyTorch's CPU-only or CUDA index), TORCH_INDEX_URL=<index url>.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (found: $("$PYTHON" --version 2>&1 || echo none)); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
    echo "installing $TORCH_SPEC"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "${PIP[@]}" install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
    else
        "${PIP[@]}" install -q "$TORCH_SPEC"
    fi
fi

echo "installing dualfocus-rig and its dependencies"
"${PIP[@]}" install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

if [ "${1:-}" != "--no-run" ]; then
    echo "running the simulated rig: python run_rig.py --config configs/sim.yaml"
    .venv/bin/python run_rig.py --config configs/sim.yaml
fi
