#!/usr/bin/env bash
# Installs dependencies (scripts/install.sh) and builds into $BUILD_DIR (default ./build).
#   scripts/build.sh                    release build with debug info
#   SANITIZE=address,undefined BUILD_DIR=build-asan scripts/build.sh
#   VERIFY=OFF scripts/build.sh         the exporter alone: no libtorch, HDF5 or PCRE2 needed
#                                       (exports with --no-verify only)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ ${ADAPTER_JOB_SKIP_INSTALL:-0} == 1 ]] || scripts/install.sh

BUILD_DIR=${BUILD_DIR:-build}
args=(-S . -B "$BUILD_DIR" -DADAPTER_JOB_WERROR=ON)
[[ -z ${VERIFY:-} ]] || args+=(-DADAPTER_JOB_VERIFY="$VERIFY")
[[ -z ${SANITIZE:-} ]] || args+=(-DADAPTER_JOB_SANITIZE="$SANITIZE" -DCMAKE_BUILD_TYPE=Debug)
mkdir -p "$BUILD_DIR"
cmake "${args[@]}" >"$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j"$(nproc)"
