#!/usr/bin/env bash
# -DADAPTER_JOB_VERIFY=OFF: configures with libtorch and HDF5 made unfindable (and checks that
# PCRE2 is not looked for), builds only the binary, and checks that it exports with --no-verify
# byte for byte as Megatron-Bridge does, and refuses verification with exit 2 and a message that
# names --no-verify and the build option, before doing any work.
# Usage: build_without_verify.sh SOURCE_DIR BUILD_DIR FIXTURES [cmake arguments...]
# BUILD_DIR is kept between runs, so a second run rebuilds only what changed.
set -euo pipefail
source_dir=$1 build_dir=$2 fixtures=$3
shift 3
fail() { echo "FAIL: $*" >&2; exit 1; }
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
unset ADAPTER_JOB_VERIFY_PLUGIN ADAPTER_JOB_CONFIG_DIR

mkdir -p "$build_dir"
hidden=()
for package in Torch Caffe2 HDF5 PCRE2; do
  hidden+=("-DCMAKE_DISABLE_FIND_PACKAGE_$package=ON")
done
# Configured as a user would (tests included), built as far as the binary only.
cmake -S "$source_dir" -B "$build_dir" -DADAPTER_JOB_VERIFY=OFF -DADAPTER_JOB_TESTS=ON \
  -UTorch_DIR "${hidden[@]}" "$@" >"$build_dir/configure.log" 2>&1 ||
  { cat "$build_dir/configure.log"; fail "configure failed"; }
# (CMake also warns that the CMAKE_DISABLE_FIND_PACKAGE_* above went unused: nothing looked.)
if grep -E 'Found Torch|adapter_job: libtorch|Found HDF5|libpcre2' "$build_dir/configure.log"; then
  fail "a verification dependency was looked for (above)"
fi
cmake --build "$build_dir" --target adapter_job -j"$(nproc)" >"$build_dir/build.log" 2>&1 ||
  { tail -50 "$build_dir/build.log"; fail "build failed"; }
bin=$build_dir/src/cli/adapter_job
if ldd "$bin" | awk '{print $1}' | grep -E '^lib(torch|c10|hdf5|pcre2)'; then
  fail "the binary links a verification library"
fi

"$bin" version | tee "$build_dir/version.out"
grep -q '^verification: not built' "$build_dir/version.out" || fail "version does not say so"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ckpt=$fixtures/tp1pp1/lora/megatron_ckpt
"$bin" export --no-verify --quiet --hf-model-id "$fixtures/hf_base" --megatron-peft-checkpoint "$ckpt" \
  --output-hf-path "$work/adapter"
cmp "$work/adapter/adapter_model.safetensors" "$fixtures/tp1pp1/lora/mb_export_adapter/adapter_model.safetensors"

# Verification asked for (the default): refused up front, nothing written.
expect_refusal() {
  local rc=0
  "$bin" "$@" 2>"$work/stderr" || rc=$?
  cat "$work/stderr"
  [[ $rc == 2 ]] || fail "'adapter_job $1' with verification exited $rc, not 2"
  grep -q -- '--no-verify' "$work/stderr" || fail "the refusal does not name --no-verify"
  grep -q -- '-DADAPTER_JOB_VERIFY=ON' "$work/stderr" || fail "the refusal does not say how to build"
}
expect_refusal export --hf-model-id "$fixtures/hf_base" --megatron-peft-checkpoint "$ckpt" \
  --output-hf-path "$work/verified"
[[ ! -e $work/verified ]] || fail "a refused export wrote $work/verified"
expect_refusal verify --hf-model-id "$fixtures/hf_base" --hf-adapter-path "$work/adapter"
echo "ADAPTER_JOB_VERIFY=OFF: configures and builds without libtorch, HDF5 and PCRE2; exports with --no-verify; refuses verification"
