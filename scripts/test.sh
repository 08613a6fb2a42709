#!/usr/bin/env bash
# Sets up, builds and runs every test: the whole suite on the normal build, then again on an
# ASan+UBSan build, so damaged and hostile inputs are also checked for memory errors.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

scripts/install.sh
ADAPTER_JOB_SKIP_INSTALL=1 BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j"$(nproc)")

if [[ ${ADAPTER_JOB_SKIP_SANITIZERS:-0} != 1 ]]; then
  ADAPTER_JOB_SKIP_INSTALL=1 BUILD_DIR=build-asan SANITIZE=address,undefined scripts/build.sh
  # Python loads no sanitized code; only our binaries it starts are instrumented. Leaks the MPI,
  # PMIx, NCCL and CUDA runtimes keep until exit are suppressed (tests/lsan.supp); keeping their
  # plugins loaded lets the suppressions see their names.
  (cd build-asan &&
   ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:fast_unwind_on_malloc=0:malloc_context_size=40 \
   LSAN_OPTIONS=suppressions="$PWD/../tests/lsan.supp" \
   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
   OMPI_MCA_mca_base_component_disable_dlclose=1 PMIX_MCA_mca_base_component_disable_dlclose=1 \
     ctest --output-on-failure -j"$(nproc)")
fi
