#!/usr/bin/env bash
# Installs the build into a temporary prefix, builds tests/install_consumer against it with
# find_package(adapter_job), and exports Megatron-Bridge's TP2xPP2 checkpoint with it.
set -euo pipefail
build_dir=$1 source_dir=$2 fixtures=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S "$source_dir/tests/install_consumer" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/build" >/dev/null
"$work/build/consumer" "$fixtures/hf_base" "$fixtures/tp2pp2/lora/megatron_ckpt" "$work/adapter"
cmp "$work/adapter/adapter_model.safetensors" "$fixtures/tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"
echo "installed package: find_package, link and export all work"
