#!/usr/bin/env bash
# Sets up, builds and runs every test: the whole suite on the normal build, then again on an
# ASan+UBSan build, so damaged and hostile inputs are also checked for memory errors; then the
# libFuzzer targets for a minute each.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

scripts/install.sh
ADAPTER_JOB_SKIP_INSTALL=1 BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)")
# Which checks caught each fault planted in an exported adapter (tests/python/test_verify.py).
[[ ! -f build/verification_mutations.txt ]] || cat build/verification_mutations.txt

if [[ ${ADAPTER_JOB_SKIP_SANITIZERS:-0} != 1 ]]; then
  ADAPTER_JOB_SKIP_INSTALL=1 BUILD_DIR=build-asan SANITIZE=address,undefined scripts/build.sh
  # Python loads no sanitized code; only our binaries it starts are instrumented. Leak checking
  # runs on the unit tests; tests/python/CMakeLists.txt turns it off for the binaries the Python
  # tests start (see there why).
  (cd build-asan &&
   ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     ctest --output-on-failure -j"$(nproc)")
fi

# The parsers of untrusted input under libFuzzer, a bounded time each (scripts/fuzz.sh).
if [[ ${ADAPTER_JOB_SKIP_FUZZ:-0} != 1 ]]; then
  scripts/fuzz.sh
fi
