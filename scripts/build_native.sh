#!/usr/bin/env bash
# Build loramux's patched llama.cpp (libllama + ggml shared libraries) without pip.
#
#   scripts/build_native.sh            CPU build into build/native/lib (loramux.native finds it there)
#   LORAMUX_CUDA=1 scripts/build_native.sh    also the CUDA backend (needs a CUDA toolkit)
#
# The llama.cpp sources come from the llama-cpp-python sdist (fetched once through pip, cached in
# build/native/loramux-sources), patched with native/patches. Rebuilds are incremental (ninja,
# and ccache when installed). Environment: PYTHON (default: .venv/bin/python, else python3),
# LORAMUX_LLAMA_SDIST (a sdist on disk), JOBS (parallel jobs, default: all cores), BUILD_DIR.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build/native}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
CUDA=OFF
case "${LORAMUX_CUDA:-0}" in 1|ON|on|true|yes) CUDA=ON ;; esac
ARGS=(-DCMAKE_BUILD_TYPE=Release -DLORAMUX_CUDA="$CUDA" -DPython_EXECUTABLE="$PYTHON"
      -DLORAMUX_SOURCES_DIR="$BUILD_DIR/loramux-sources" -DCMAKE_INSTALL_PREFIX="$BUILD_DIR")
if [[ -n "${LORAMUX_LLAMA_SDIST:-}" ]]; then ARGS+=(-DLORAMUX_LLAMA_SDIST="$LORAMUX_LLAMA_SDIST"); fi
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

start=$(date +%s)
# configure once; later runs re-configure only when native/ inputs change
if [[ ! -f "$BUILD_DIR/cmake/CMakeCache.txt" ]]; then
  cmake -S "$ROOT/native" -B "$BUILD_DIR/cmake" "${GEN[@]}" "${ARGS[@]}"
fi
nice -n 10 cmake --build "$BUILD_DIR/cmake" -j "$JOBS"
cmake --install "$BUILD_DIR/cmake" --component loramux >/dev/null
echo "loramux: native libraries in $BUILD_DIR/lib ($(( $(date +%s) - start )) s)"
