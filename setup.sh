#!/usr/bin/env bash
# Sets up DualFocus Rig in ./.venv and runs the simulated rig once (no hardware, no GPU).
#   ./setup.sh            set up, then run: python run_rig.py --config configs/sim.yaml
#   ./setup.sh --no-run   set up only
# Which torch build: a CPU build is installed unless torch is already in .venv.
#   TORCH_SPEC='torch==2.13.0' (default) and, for another wheel index (for example
#   PyTorch's CPU-only or CUDA index), TORCH_INDEX_URL=<index url>.
# Which ONNX Runtime build: ORT_BUILD=plain (default: the onnxruntime wheel) or
#   ORT_BUILD=openvino (the onnxruntime-openvino wheel: adds OpenVINO's bf16 path on CPUs with
#   native bfloat16, but its ONNX Runtime is too old for our int8 recipe; see the README).
set -euo pipefail
cd "$(dirname "$0")"

ORT_BUILD=${ORT_BUILD:-plain}
case "$ORT_BUILD" in
    plain) EXTRAS="dev,onnx"; THIS_ORT=onnxruntime; OTHER_ORT=onnxruntime-openvino ;;
    openvino) EXTRAS="dev,openvino"; THIS_ORT=onnxruntime-openvino; OTHER_ORT=onnxruntime ;;
    *) echo "error: ORT_BUILD must be plain or openvino, got '$ORT_BUILD'" >&2; exit 2 ;;
esac

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

# both builds install the same onnxruntime module: where the other one is installed, remove
# both (removing one deletes files the other's record still claims) and install this one afresh
if "${PIP[@]}" show -q "$OTHER_ORT" >/dev/null 2>&1; then
    echo "removing $OTHER_ORT (ORT_BUILD=$ORT_BUILD installs the other build of the onnxruntime module)"
    "${PIP[@]}" uninstall -q -y "$OTHER_ORT" "$THIS_ORT" 2>&1 | grep -v "as it is not installed" >&2 || true
fi

echo "installing dualfocus-rig and its dependencies ($ORT_BUILD ONNX Runtime)"
"${PIP[@]}" install -q -e ".[$EXTRAS]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

if [ "${1:-}" != "--no-run" ]; then
    echo "running the simulated rig: python run_rig.py --config configs/sim.yaml"
    .venv/bin/python run_rig.py --config configs/sim.yaml
fi
