#!/usr/bin/env bash
# Build a stock (unpatched) llama-server from the llama.cpp that loramux's native library is built
# from: vendor/llama.cpp of the llama-cpp-python sdist, without loramux's overlay and patches.
# For tests and benchmarks that compare against upstream's server (tests/llama_server.py).
#
#   scripts/build_llama_server.sh            build once, print the binary's path (last stdout line)
#   scripts/build_llama_server.sh --force    rebuild (incremental) even if the binary exists
#
# Everything lives in $LORAMUX_HOME/llama-server/<llama-cpp-python version>/ (default
# LORAMUX_HOME=~/.cache/loramux), so it survives fresh clones: llama.cpp/ (sources), build/ (CMake
# build folder), bin/llama-server (the binary, copied there only after a successful build). The
# sdist is shared with the native build ($LORAMUX_HOME/native/sdist, fetched once through pip).
# Only the llama-server target is built: static libraries (the binary cannot pick up another
# libllama), CPU only, -march=native, no curl/openssl, no web UI (the sdist ships no UI assets;
# the UI's network download is switched off; the API is unaffected). Ninja and ccache when present.
# Progress goes to stderr. Environment: PYTHON (default: .venv/bin/python, else python3),
# LORAMUX_LLAMA_SDIST (a sdist on disk), JOBS (parallel jobs, default: all cores).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$/\1/p' "$ROOT/native/fetch_llama.py")"
COMMIT="$(sed -n 's/^VENDORED_COMMIT = "\(.*\)"$/\1/p' "$ROOT/native/fetch_llama.py")"
if [[ -z "$VERSION" ]]; then
  echo "loramux: cannot read LLAMA_CPP_PYTHON_VERSION from native/fetch_llama.py" >&2; exit 1
fi
HOME_DIR="${LORAMUX_HOME:-$HOME/.cache/loramux}"
DIR="$HOME_DIR/llama-server/$VERSION"
BIN="$DIR/bin/llama-server"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

if [[ $FORCE == 0 && -x "$BIN" ]]; then echo "$BIN"; exit 0; fi

mkdir -p "$DIR"
# one build at a time (parallel test workers may all ask for the binary)
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/.lock"
  flock 9
  if [[ $FORCE == 0 && -x "$BIN" ]]; then echo "$BIN"; exit 0; fi
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
FETCH=(--dest "$DIR" --unpatched --sdist-dir "$HOME_DIR/native/sdist" --version "$VERSION")
if [[ -n "${LORAMUX_LLAMA_SDIST:-}" ]]; then FETCH+=(--sdist "$LORAMUX_LLAMA_SDIST"); fi
SRC="$("$PYTHON" "$ROOT/native/fetch_llama.py" "${FETCH[@]}")"
SRC="$(tail -n 1 <<<"$SRC")"

# the server target's sources (it embeds the web UI, which the sdist does not ship: with neither
# npm nor the prebuilt download, scripts/ui-assets.cmake generates an empty asset table)
for f in tools/server/CMakeLists.txt tools/server/server.cpp tools/server/main.cpp \
         tools/ui/CMakeLists.txt tools/ui/ui.cpp.in tools/ui/ui.h.in scripts/ui-assets.cmake \
         vendor/cpp-httplib/CMakeLists.txt; do
  if [[ ! -f "$SRC/$f" ]]; then
    echo "loramux: $SRC lacks $f: this llama.cpp cannot build llama-server" >&2; exit 1
  fi
done
if [[ -f "$SRC/tools/ui/dist/index.html" ]]; then
  echo "loramux: the sdist ships web UI assets (tools/ui/dist); they are embedded" >&2
else
  echo "loramux: no web UI assets in the sdist: llama-server is built without its web UI (API only)" >&2
fi

GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
ARGS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
      -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_TOOLS_INSTALL=OFF
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
      -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="${COMMIT:-unknown}")
if command -v ccache >/dev/null 2>&1; then
  ARGS+=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
else
  ARGS+=(-DGGML_CCACHE=OFF)
fi
# no AMX kernels on x86: ggml's AMX mul_mat segfaults on the Q4_1 default model on Sapphire Rapids VMs
if [[ "$(uname -m)" == "x86_64" ]]; then
  ARGS+=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
fi
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

start=$(date +%s)
# llama.cpp's build-info asks git for the commit: keep it from finding a repository above $DIR
export GIT_CEILING_DIRECTORIES="$DIR"
if [[ ! -f "$DIR/build/CMakeCache.txt" ]]; then
  cmake -S "$SRC" -B "$DIR/build" "${GEN[@]}" "${ARGS[@]}" >&2
fi
nice -n 10 cmake --build "$DIR/build" --target llama-server -j "$JOBS" >&2
built="$DIR/build/bin/llama-server"
if [[ ! -x "$built" ]]; then
  echo "loramux: the build finished but $built is missing" >&2; exit 1
fi
mkdir -p "$DIR/bin"
cp "$built" "$BIN.tmp.$$"
mv -f "$BIN.tmp.$$" "$BIN"
echo "loramux: llama-server built in $(( $(date +%s) - start )) s" >&2
echo "$BIN"
