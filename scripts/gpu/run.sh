#!/usr/bin/env bash
# Run ON the GPU machine (device call with carry: [".gpu-carry"]): unpacks the carried .debs into
# a prefix inside the tree (never over /), builds against the image's libtorch, Open MPI, NCCL,
# HDF5 and CUDA, runs the tests and the GPU checks, and leaves logs in $OUT.
#   scripts/gpu/run.sh [ctest regex]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
prefix=$PWD/.gpu-carry/prefix
rm -rf "$prefix" && mkdir -p "$prefix"
for deb in .gpu-carry/debs/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
libdir=$prefix/usr/lib/x86_64-linux-gnu
# The carried .pc files say prefix=/usr: the sysroot points them at the unpacked copy.
export PKG_CONFIG_PATH=$libdir/pkgconfig PKG_CONFIG_SYSROOT_DIR=$prefix
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ADAPTER_JOB_SHARED=$PWD/.gpu-carry/shared
torch_prefix=$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')

{
  nvidia-smi -L
  cmake -S . -B build-gpu -G Ninja -DADAPTER_JOB_WERROR=ON \
    -DCMAKE_PREFIX_PATH="$torch_prefix" -DBoost_DIR="$libdir/cmake/Boost-1.74.0" \
    -DADAPTER_JOB_SHARED_DIR="$ADAPTER_JOB_SHARED" -DPython3_EXECUTABLE="$(command -v python3)"
} >"$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j"$(nproc)" >"$OUT/build.log" 2>&1 || { grep -E "error|Error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build ok"
build-gpu/src/cli/adapter_job version | tee "$OUT/version.txt"

(cd build-gpu && ctest --output-on-failure --timeout 240 -j8 ${1:+-R "$1"}) >"$OUT/ctest.log" 2>&1
echo "ctest exit $?"; grep -E "tests passed|tests failed|\*\*\*Failed" "$OUT/ctest.log"

# GPU checks: the NCCL backend gives the MPI backend's bytes, and CUDA verification the CPU's logits.
F=$ADAPTER_JOB_SHARED/fixtures/megatron-bridge
B=build-gpu/src/cli/adapter_job
gpus=$(nvidia-smi -L | wc -l)
status=0
for backend in mpi nccl; do
  rm -rf "/tmp/gpu-$backend"
  mpirun --oversubscribe -np "$gpus" $B export --hf-model-id "$F/hf_base" \
    --megatron-peft-checkpoint "$F/tp2pp2/lora/megatron_ckpt" --output-hf-path "/tmp/gpu-$backend" \
    --backend "$backend" --verify-device cuda --verify-h5 "$OUT/verify-cuda-$backend.h5" \
    --report "$OUT/report-$backend.json" >"$OUT/export-$backend.log" 2>&1 || status=1
  tail -3 "$OUT/export-$backend.log"
done
cmp /tmp/gpu-mpi/adapter_model.safetensors /tmp/gpu-nccl/adapter_model.safetensors &&
  cmp /tmp/gpu-mpi/adapter_config.json /tmp/gpu-nccl/adapter_config.json &&
  echo "NCCL output == MPI output" || status=1
$B verify --hf-model-id "$F/hf_base" --hf-adapter-path /tmp/gpu-mpi \
  --megatron-peft-checkpoint "$F/tp2pp2/lora/megatron_ckpt" --verify-device cpu \
  --verify-h5 "$OUT/verify-cpu.h5" >"$OUT/verify-cpu.log" 2>&1 || status=1
python3 - "$OUT/verify-cuda-nccl.h5" "$OUT/verify-cpu.h5" <<'PY' || status=1
import sys, h5py, numpy as np
with h5py.File(sys.argv[1]) as g, h5py.File(sys.argv[2]) as c:
    worst = 0.0
    for v in ("base", "peft", "merged"):
        a, b = g[f"prompts/0/logits/{v}"][()], c[f"prompts/0/logits/{v}"][()]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    print(f"CUDA vs CPU verification logits: max relative difference {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)
PY
exit $status
