#!/usr/bin/env bash
# Set up loramux in ./.venv on a fresh machine (idempotent; fast when already done).
#   bash scripts/setup.sh         runtime only (enough for `loramux demo`)
#   bash scripts/setup.sh --dev   + torch/PEFT (oracles), onnx/onnxruntime, pytest
# llama-cpp-python 0.3.36 is compiled from its sdist once (about 10 minutes on 2 cores);
# pip's wheel cache makes every later install take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1
PY="${PYTHON:-python3}"
VENV=.venv

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "loramux setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "loramux setup: installing llama-cpp-python 0.3.36 (first build compiles llama.cpp: ~10 min on 2 cores)"
  # Only the libraries: no llama.cpp tools, tests, examples, server or multimodal library.
  # No AMX on x86 (ggml's AMX mul_mat segfaults on the Q4_1 default model on Sapphire Rapids VMs;
  # native/CMakeLists.txt does the same for loramux's library).
  NO_AMX=""
  [[ "$(uname -m)" == "x86_64" ]] && NO_AMX="-DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 -DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"
  CMAKE_ARGS="${CMAKE_ARGS:-} $NO_AMX -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    "${PIP[@]}" install "llama-cpp-python==0.3.36"
fi

EXTRAS="[serve]"
if [[ $DEV == 1 ]]; then
  # The CPU build of torch that this machine kind ships; a bare `torch` would pull a CUDA build.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
  EXTRAS="[serve,train,onnx,dev]"
fi
echo "loramux setup: installing loramux$EXTRAS"
"${PIP[@]}" install ".$EXTRAS"
echo "loramux setup: done ($("$VENV/bin/loramux" --version))"
