#!/usr/bin/env bash
# Installs the build into a temporary prefix and checks the installed package as a user meets it:
#   1. tests/install_consumer (project(x CXX), no C compiler) configures with find_package while
#      MPI, CUDA, NCCL, HDF5 and Torch cannot be found, links adapter_job::adapter_job, and
#      exports Megatron-Bridge's TP2xPP2 checkpoint byte for byte as Megatron-Bridge does;
#   2. with verification built, it verifies an export through the plugin the installed library
#      finds by itself (ADAPTER_JOB_VERIFY_PLUGIN unset);
#   3. the installed binary reads its defaults from <prefix>/share/adapter_job/config, not from
#      the source tree, and finds the installed plugin.
# Usage: run.sh BUILD_DIR SOURCE_DIR FIXTURES VERIFY(ON|OFF)
set -euo pipefail
build_dir=$1 source_dir=$2 fixtures=$3 verify=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
work=$(realpath "$work")  # the binary reports real paths
prefix=$work/prefix
unset ADAPTER_JOB_VERIFY_PLUGIN ADAPTER_JOB_CONFIG_DIR
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build_dir" --prefix "$prefix" >/dev/null
package_dir=$(dirname "$(find "$prefix" -name adapter_jobConfig.cmake)")
if grep -nE '^[^#]*(MPI|CUDA|NCCL|HDF5|[Tt]orch|PCRE2|yaml)' "$package_dir"/*.cmake; then
  fail "the installed package names a private dependency of libadapter_job (above)"
fi

# 1. A C++-only consumer; every package the library uses privately is made unfindable.
hidden=()
for package in MPI CUDAToolkit CUDA NCCL HDF5 Torch PkgConfig yaml-cpp OpenSSL; do
  hidden+=("-DCMAKE_DISABLE_FIND_PACKAGE_$package=ON")
done
cmake -S "$source_dir/tests/install_consumer" -B "$work/build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_IGNORE_PREFIX_PATH="/usr/local/cuda" "${hidden[@]}" >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log"; fail "the consumer does not configure"; }
if grep -q 'Check for working C compiler' "$work/configure.log"; then
  fail "the consumer's configure enabled C"
fi
cmake --build "$work/build" >/dev/null
"$work/build/consumer" "$fixtures/hf_base" "$fixtures/tp2pp2/lora/megatron_ckpt" "$work/adapter"
cmp "$work/adapter/adapter_model.safetensors" "$fixtures/tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"

plugin=$(find "$prefix" -name libadapter_job_verify.so)
# 2. Verification through the plugin, found relative to the installed libadapter_job.so.
if [[ $verify == ON ]]; then
  [[ -n $plugin ]] || fail "verification is built but no plugin was installed"
  "$work/build/consumer" "$fixtures/hf_base" "$fixtures/tp2pp2/lora/megatron_ckpt" \
    "$work/verified" --verify | tee "$work/verify.out"
  grep -qxF "plugin: $plugin" "$work/verify.out" || fail "the library did not find $plugin"
  grep -qx 'verification: passed' "$work/verify.out" || fail "verification did not pass"
else
  [[ -z $plugin ]] || fail "a build without verification installed $plugin"
fi

# 3. The installed binary: its config dir and plugin are the prefix's.
config_dir=$prefix/share/adapter_job/config
"$prefix/bin/adapter_job" version | tee "$work/version.out"
grep -qxF "config: $config_dir" "$work/version.out" || fail "the binary does not read $config_dir"
if [[ $verify == ON ]]; then
  grep -qxF "verification plugin: $plugin" "$work/version.out" || fail "the binary does not find $plugin"
fi
# And it takes its defaults from there: a default changed in the installed copy shows.
sed -i 's/^output-hf-path = .*/output-hf-path = installed_default_adapter/' "$config_dir/export.ini"
(cd "$work" && "$prefix/bin/adapter_job" export --print-config --hf-model-id x \
  --megatron-peft-checkpoint y) >"$work/print-config.out"
grep -F 'output-hf-path = installed_default_adapter' "$work/print-config.out" ||
  { cat "$work/print-config.out"; fail "the installed defaults were not read"; }
(cd "$work" && "$prefix/bin/adapter_job" export --no-verify --hf-model-id "$fixtures/hf_base" \
  --megatron-peft-checkpoint "$fixtures/tp2pp2/lora/megatron_ckpt" --quiet)
cmp "$work/installed_default_adapter/adapter_model.safetensors" \
  "$fixtures/tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"
echo "installed package: find_package from C++ alone, link, export, verify and defaults all work"
