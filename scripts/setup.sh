#!/usr/bin/env bash
# Set up loramux in ./.venv on a fresh machine (idempotent; fast when already done).
#   bash scripts/setup.sh         runtime only (enough for `loramux demo`)
#   bash scripts/setup.sh --dev   + torch/PEFT (oracles), onnx/onnxruntime, Ray, pytest, Chromium (apt-get)
# llama.cpp is compiled once: loramux's patched libllama (pip install ., ~6 minutes on 2 cores the
# first time). llama-cpp-python 0.3.36 is installed from its sdist without a library of its own
# (LLAMA_BUILD=OFF, seconds): `import loramux` points it at the patched one, so exactly one
# libllama is ever loaded. pip's caches make every later run take seconds.
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

HOME_DIR="${LORAMUX_HOME:-$HOME/.cache/loramux}"
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '0.3.36')" 2>/dev/null; then
  echo "loramux setup: installing llama-cpp-python 0.3.36 without its own llama.cpp (loramux's patched libllama serves it)"
  # the sdist through pip (the same file the native build takes llama.cpp from); reading its
  # metadata needs its build backend
  "${PIP[@]}" install "scikit-build-core>=0.10"
  SDIST="$("$VENV/bin/python" native/fetch_llama.py --dest "$HOME_DIR/native" --sdist-only | tail -n 1)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${PIP[@]}" install "$SDIST"
fi

EXTRAS="[serve]"
if [[ $DEV == 1 ]]; then
  # The CPU build of torch that this machine kind ships; a bare `torch` would pull a CUDA build.
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" install "torch==2.13.0"
  EXTRAS="[serve,ray,train,onnx,dev]"
  # The playground's browser test (tests/test_webui.py) drives Debian's Chromium through its driver.
  if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    echo "loramux setup: installing Debian's chromium and chromium-driver (the browser test)"
    SUDO=(); [[ $(id -u) != 0 ]] && SUDO=(sudo)
    "${SUDO[@]}" apt-get install -y -q chromium chromium-driver >/dev/null \
      || { "${SUDO[@]}" apt-get update -q >/dev/null && "${SUDO[@]}" apt-get install -y -q chromium chromium-driver >/dev/null; } \
      || echo "loramux setup: WARNING: could not install chromium and chromium-driver; tests/test_webui.py needs them (apt-get install chromium chromium-driver)" >&2
  fi
fi
echo "loramux setup: installing loramux$EXTRAS"
"${PIP[@]}" install ".$EXTRAS"
echo "loramux setup: done ($("$VENV/bin/loramux" --version))"
