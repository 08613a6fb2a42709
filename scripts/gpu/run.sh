#!/usr/bin/env bash
# Run ON a GPU machine (device call with carry: [".gpu-carry"], made by scripts/gpu/fetch.sh here):
# unpacks the carried .debs into a prefix inside the tree (never over /), builds against the
# image's libtorch, Open MPI, NCCL, HDF5 and CUDA, then runs the stages asked for:
#   tests         ctest -L gpu (must run, not skip), the whole suite, and the NCCL-vs-MPI and
#                 CUDA-vs-CPU checks on Megatron-Bridge's own TP2xPP2 checkpoint
#   gpu-tests     ctest -L gpu alone (a quick check of the GPU path after a change)
#   bench-export  bench/gpu_bench.sh export (8B and 70B shapes, TP2xPP2, -np 4)
#   bench-verify  bench/gpu_bench.sh verify (8B shape, one GPU)
#   trust-1b      a Llama-3.2-1B-shaped model (vocab 128256, tied) with an r16 LoRA: `export` (CUDA
#                 verification, the default) and `verify` must pass; their figures go to the summary
#   merge-1b      the same model merged on the GPU (`adapter_job merge --merge-device cuda`, CUDA
#                 verification) must pass and equal the CPU's merge byte for byte, and `verify
#                 --merged-model` on the CPU must give the same verdict; figures to the summary
#   trust-nemotron-h  bench/nemotron_h_trust.py: a Nemotron-H-8B-wide model (4 layers "M*M-", vocab
#                 131072) exported with CUDA verification; our logits held to transformers' and
#                 stock PEFT's on the GPU
#   bench-merge   bench/merge_bench.sh at the 8B shape with 16 layers (LoRA r16; MERGE_SHAPE and
#                 MERGE_LAYERS pick another): the merge on the GPU (verified on CUDA) and on the
#                 CPU, beside the floor and the Python reference
#   merge-scaling bench/merge_bench.sh on the GPUs at 1, 2, 4 and 8 ranks (as many as the machine
#                 has; one GPU per rank): the 8B shape with 16 layers and the 70B shape cut to
#                 MERGE_70B_LAYERS (default 8) layers; wall, peak RSS and GPU buffers per rank
#                 beside the read+write floor (issue 17)
#   select        ctest -R "$CTEST_SELECT" in the GPU build (g++ 13 / CMake 4): CPU tests that must
#                 also pass on the image's toolchain, e.g. install.find_package|comm.mpi
#   all           the three, in that order (about 12 minutes on 4 H100s: more than one device call
#                 allows, so split it over two calls on the same machine)
#   scripts/gpu/run.sh [tests|bench-export|bench-verify|all]...   (default: tests)
# Logs and results go to $OUT: summary.md (what passed, the benchmark tables) and logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/out}
LOGS=/tmp/adapter_job-gpu-logs
mkdir -p "$OUT" "$LOGS"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0
[[ $# -gt 0 ]] || set -- tests
[[ $* == all ]] && set -- tests bench-export bench-verify
SUMMARY=$OUT/summary.md
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
finish() {
  cp -r bench/results "$LOGS/" 2>/dev/null
  tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
  exit $status
}
trap finish EXIT

prefix=$PWD/.gpu-carry/prefix
rm -rf "$prefix" && mkdir -p "$prefix"
for deb in .gpu-carry/debs/*.deb; do dpkg-deb -x "$deb" "$prefix"; done
libdir=$prefix/usr/lib/x86_64-linux-gnu
# The carried .pc files say prefix=/usr: the sysroot points them at the unpacked copy.
export PKG_CONFIG_PATH=$libdir/pkgconfig PKG_CONFIG_SYSROOT_DIR=$prefix
export LD_LIBRARY_PATH=$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export ADAPTER_JOB_SHARED=$PWD/.gpu-carry/shared
torch_prefix=$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
# OpenSSL (sha256 for integrity.json): where the image lacks its headers, Debian 12's (OpenSSL
# 3.0, the ABI of every libcrypto.so.3) go with the image's own libcrypto.so.3, so that nothing
# else of the image (Python's ssl) sees another OpenSSL; the carried library only if it has none.
openssl_args=()
if [[ ! -f /usr/include/openssl/evp.h ]]; then
  ssl=$PWD/.gpu-carry/openssl
  rm -rf "$ssl" && mkdir -p "$ssl"
  for deb in .gpu-carry/debs/openssl/*.deb; do dpkg-deb -x "$deb" "$ssl"; done
  crypto=$(ldconfig -p | awk '/libcrypto\.so\.3 .*x86-64/ {print $NF; exit}')
  if [[ -z $crypto ]]; then
    crypto=$ssl/usr/lib/x86_64-linux-gnu/libcrypto.so.3
    export LD_LIBRARY_PATH=$ssl/usr/lib/x86_64-linux-gnu:$LD_LIBRARY_PATH
  fi
  # The multiarch directory holds openssl/configuration.h; -isystem-like, so -Werror ignores them.
  export CPLUS_INCLUDE_PATH=$ssl/usr/include/x86_64-linux-gnu:$ssl/usr/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  openssl_args=(-DOPENSSL_INCLUDE_DIR="$ssl/usr/include" -DOPENSSL_CRYPTO_LIBRARY="$crypto")
fi

note "## GPU run $(date -u +%Y-%m-%dT%H:%MZ): $*"
nvidia-smi -L | tee -a "$SUMMARY"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DADAPTER_JOB_WERROR=ON \
  -DCMAKE_PREFIX_PATH="$torch_prefix" -DBoost_DIR="$libdir/cmake/Boost-1.74.0" \
  -DADAPTER_JOB_SHARED_DIR="$ADAPTER_JOB_SHARED" -DPython3_EXECUTABLE="$(command -v python3)" \
  "${openssl_args[@]}" \
  >"$LOGS/configure.log" 2>&1 || { tail -40 "$LOGS/configure.log"; status=1; exit; }
# Benchmarks alone need only the job and its verification plugin. `-k 0` keeps building past the
# first error, so one device call shows every error the image's newer g++ finds.
targets=()
[[ " $* " == *" tests "* || " $* " == *" gpu-tests "* || " $* " == *" select "* ]] || targets=(--target adapter_job verify_plugin)
cmake --build build-gpu -j"$(nproc)" "${targets[@]}" -- -k 0 >"$LOGS/build.log" 2>&1 ||
  { grep -E "error:|Error " -A3 "$LOGS/build.log" | head -150; status=1; exit; }
note "build ok ($(($(date +%s) - start)) s)"
B=build-gpu/src/cli/adapter_job
$B version | tee -a "$SUMMARY"
# The export benchmark's ranks: 4 (TP2xPP2 checkpoints); NCCL needs a GPU each, so with it
# (bench/gpu_bench.sh's default BACKENDS) one per GPU. BACKENDS=mpi runs 4 ranks on any machine.
gpus=$(nvidia-smi -L | wc -l)
if [[ ${BACKENDS:-nccl mpi} == *nccl* ]]; then
  export RANKS=${RANKS:-$((gpus < 4 ? gpus : 4))}
else
  export RANKS=${RANKS:-4}
fi

run_gpu_tests() {
  # On this machine the GPU label must run, never skip.
  (cd build-gpu && ctest -L gpu -V --timeout 600) >"$LOGS/ctest-gpu.log" 2>&1 || status=1
  # A skip is a failure here, unless the test needs more GPUs than this machine has (the multi-GPU
  # tests of issue 17 on a one-GPU machine); those are listed as skipped.
  local test
  while read -r test; do
    if grep -qE "^$test: .*needs [0-9]+ (CUDA )?GPUs, this machine has" "$LOGS/ctest-gpu.log"; then
      note "GPU test #$test skipped: it needs more GPUs than this machine has"
    else
      note "GPU test #$test SKIPPED on a GPU machine"; status=1
    fi
  done < <(grep -oE "Test +#[0-9]+: [^ ]+ \.*\*\*\*Skipped" "$LOGS/ctest-gpu.log" |
    sed -E 's/Test +#([0-9]+).*/\1/')
  note "ctest -L gpu: $(grep -E "tests passed|tests failed" "$LOGS/ctest-gpu.log")"
  grep -E "SKIPPED|FAILED|[0-9]+ (passed|failed|skipped)" "$LOGS/ctest-gpu.log" | tee -a "$SUMMARY"
}

run_tests() {
  run_gpu_tests
  (cd build-gpu && ctest -LE gpu --output-on-failure --timeout 300 -j"$(($(nproc) / 4))") >"$LOGS/ctest.log" 2>&1 || status=1
  note "ctest (the rest): $(grep -E "tests passed|tests failed" "$LOGS/ctest.log")"
  grep -E "\*\*\*Failed|Timeout" "$LOGS/ctest.log" | tee -a "$SUMMARY"

  # Megatron-Bridge's own checkpoint: NCCL gives the MPI backend's bytes, CUDA the CPU's logits.
  local F=$ADAPTER_JOB_SHARED/fixtures/megatron-bridge backend
  for backend in mpi nccl; do
    rm -rf "/tmp/gpu-$backend"
    mpirun --oversubscribe -np "$gpus" -x NCCL_NVLS_ENABLE $B export --hf-model-id "$F/hf_base" \
      --megatron-peft-checkpoint "$F/tp2pp2/lora/megatron_ckpt" --output-hf-path "/tmp/gpu-$backend" \
      --backend "$backend" --verify-device cuda --verify-h5 "$LOGS/verify-cuda-$backend.h5" \
      --report "$LOGS/report-$backend.json" >"$LOGS/export-$backend.log" 2>&1 || status=1
  done
  if cmp /tmp/gpu-mpi/adapter_model.safetensors /tmp/gpu-nccl/adapter_model.safetensors &&
    cmp /tmp/gpu-mpi/adapter_config.json /tmp/gpu-nccl/adapter_config.json; then
    note "Megatron-Bridge TP2xPP2, -np $gpus: NCCL output == MPI output"
  else
    note "Megatron-Bridge TP2xPP2: NCCL output DIFFERS from MPI output"; status=1
  fi
  $B verify --hf-model-id "$F/hf_base" --hf-adapter-path /tmp/gpu-mpi \
    --megatron-peft-checkpoint "$F/tp2pp2/lora/megatron_ckpt" --verify-device cpu \
    --verify-h5 "$LOGS/verify-cpu.h5" >"$LOGS/verify-cpu.log" 2>&1 || status=1
  python3 - "$LOGS/verify-cuda-nccl.h5" "$LOGS/verify-cpu.h5" <<'PY' | tee -a "$SUMMARY" || status=1
import sys, h5py, numpy as np
with h5py.File(sys.argv[1]) as g, h5py.File(sys.argv[2]) as c:
    worst = 0.0
    for v in ("base", "peft", "merged"):
        a, b = g[f"prompts/0/logits/{v}"][()], c[f"prompts/0/logits/{v}"][()]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    print(f"Megatron-Bridge TP2xPP2: CUDA vs CPU verification logits, max relative difference {worst:.2e}")
    sys.exit(0 if worst < 1e-4 else 1)
PY
}

# Every check of the verification reports given, and whether all passed.
print_checks() {
  python3 - "$@" <<'PY'
import json, sys
ok = True
for path in sys.argv[1:]:
    report = json.load(open(path))
    v = report.get("verification", report)
    ok &= v["passed"]
    print(f"{path.rsplit('/', 1)[1]}: device {v['device']}, passed {v['passed']}")
    for c in v["checks"]:
        print(f"  {'PASS' if c['passed'] else 'FAIL'} {c['name']} {c['figure']!r} {c['relation']} {c['threshold']!r}")
sys.exit(0 if ok else 1)
PY
}

# A Llama-3.2-1B-shaped model with an r16 LoRA checkpoint in /tmp/trust-1b, made once.
make_1b() {
  local dir=/tmp/trust-1b
  [[ -f $dir/ckpt/latest_checkpointed_iteration.txt ]] && return 0
  rm -rf "$dir" && mkdir -p "$dir"
  python3 bench/llama_shape.py --shape 1b --out "$dir/hf" --weights >"$LOGS/trust-1b-model.log" 2>&1 || return 1
  # shellcheck disable=SC2046  # the shape's dims, one word each
  python3 tests/fixtures/megatron_checkpoint.py --out "$dir/ckpt" --base-model "$dir/hf" --no-expected \
    $(python3 bench/llama_shape.py --shape 1b --checkpoint-args) >"$LOGS/trust-1b-ckpt.log" 2>&1
}

# The verdict on a real vocabulary on the GPU (issue 12): a correct export must pass with margin.
run_trust_1b() {
  local dir=/tmp/trust-1b
  make_1b || { status=1; return; }
  rm -rf "$dir/adapter"
  $B export --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$dir/ckpt" --output-hf-path "$dir/adapter" \
    --report "$LOGS/trust-1b-export.json" >"$LOGS/trust-1b-export.log" 2>&1
  note "1B-shaped export (CUDA verification): exit $?"
  $B verify --hf-model-id "$dir/hf" --hf-adapter-path "$dir/adapter" --megatron-peft-checkpoint "$dir/ckpt" \
    --verify-device cuda --report "$LOGS/trust-1b-verify.json" >"$LOGS/trust-1b-verify.log" 2>&1
  note "1B-shaped verify --verify-device cuda: exit $?"
  print_checks "$LOGS/trust-1b-export.json" "$LOGS/trust-1b-verify.json" | tee -a "$SUMMARY" || status=1
}

# The merged export's verdict on the GPU (issue 14): a correct merge passes on CUDA and on the CPU.
run_merge_1b() {
  local dir=/tmp/trust-1b
  make_1b || { status=1; return; }
  rm -rf "$dir/merged" "$dir/merged.unverified" "$dir/adapter"
  $B merge --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$dir/ckpt" --output-hf-path "$dir/merged" \
    --merge-device cuda --verify-device cuda --report "$LOGS/merge-1b.json" >"$LOGS/merge-1b.log" 2>&1
  note "1B-shaped merge on the GPU (CUDA verification): exit $?"
  rm -rf "$dir/merged-cpu"
  $B merge --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$dir/ckpt" --output-hf-path "$dir/merged-cpu" \
    --merge-device cpu --no-verify --report "$LOGS/merge-1b-cpu.json" >"$LOGS/merge-1b-cpu.log" 2>&1 || status=1
  if diff -rq "$dir/merged" "$dir/merged-cpu" >/dev/null; then
    note "1B-shaped merge: the GPU's files == the CPU's ($(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["output_per_rank"]["device"], r["output_per_rank"]["seconds"])' "$LOGS/merge-1b.json") vs $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["output_per_rank"]["device"], r["output_per_rank"]["seconds"])' "$LOGS/merge-1b-cpu.json"))"
  else
    note "1B-shaped merge: the GPU's files DIFFER from the CPU's"; status=1
  fi
  $B export --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$dir/ckpt" --output-hf-path "$dir/adapter" \
    --no-verify >"$LOGS/merge-1b-adapter.log" 2>&1 || status=1
  $B verify --hf-model-id "$dir/hf" --hf-adapter-path "$dir/adapter" --megatron-peft-checkpoint "$dir/ckpt" \
    --merged-model "$dir/merged" --verify-device cpu --report "$LOGS/merge-1b-verify-cpu.json" \
    >"$LOGS/merge-1b-verify-cpu.log" 2>&1
  note "1B-shaped verify --merged-model --verify-device cpu: exit $?"
  print_checks "$LOGS/merge-1b.json" "$LOGS/merge-1b-verify-cpu.json" | tee -a "$SUMMARY" || status=1
}

for stage in "$@"; do
  t=$(date +%s)
  case $stage in
    tests) run_tests ;;
    gpu-tests) run_gpu_tests ;;
    bench-export) BIN=$B bash bench/gpu_bench.sh export 2>&1 | tee -a "$SUMMARY" || status=1 ;;
    bench-verify) BIN=$B bash bench/gpu_bench.sh verify 2>&1 | tee -a "$SUMMARY" || status=1 ;;
    trust-1b) run_trust_1b ;;
    trust-nemotron-h)
      python3 bench/nemotron_h_trust.py --work /tmp/trust-nemotron-h --bin "$B" 2>"$LOGS/trust-nemotron-h.log" |
        tee -a "$SUMMARY"
      rc=${PIPESTATUS[0]}
      note "Nemotron-H-wide export and forward vs transformers (CUDA): exit $rc"
      [[ $rc -eq 0 ]] || status=1
      ;;
    merge-1b) run_merge_1b ;;
    select)
      (cd build-gpu && ctest -R "${CTEST_SELECT:?select needs CTEST_SELECT}" --output-on-failure --timeout 300) \
        >"$LOGS/ctest-select.log" 2>&1 || status=1
      note "ctest -R '$CTEST_SELECT': $(grep -E "tests passed|tests failed" "$LOGS/ctest-select.log")"
      grep -E "Test +#|\*\*\*Failed|Timeout" "$LOGS/ctest-select.log" | tee -a "$SUMMARY" ;;
    bench-merge)
      # The GPU merge with the floor, verification on CUDA and the Python reference; then the CPU
      # merge of the same model (16 threads) alone.
      # MERGE_SHAPE/MERGE_LAYERS pick another shape (70b 4: the 70B shape cut to 4 layers).
      MERGE_DEVICE=cuda VERIFY_DEVICE=cuda RANKS=direct SHAPE=${MERGE_SHAPE:-8b} \
        LAYERS=${MERGE_LAYERS:-16} BIN=$B \
        bash bench/merge_bench.sh /tmp/bench-work 2>&1 | tee -a "$SUMMARY" || status=1
      MERGE_DEVICE=cpu VERIFY=0 REFERENCE=0 RANKS=direct SHAPE=${MERGE_SHAPE:-8b} \
        LAYERS=${MERGE_LAYERS:-16} BIN=$B \
        bash bench/merge_bench.sh /tmp/bench-work 2>&1 | tee -a "$SUMMARY" || status=1 ;;
    merge-scaling)
      ranks="direct"
      for n in 2 4 8; do [[ $n -le $gpus ]] && ranks+=" $n"; done
      for shape in "8b 16" "70b ${MERGE_70B_LAYERS:-8}"; do
        read -r merge_shape merge_layers <<<"$shape"
        MERGE_DEVICE=cuda VERIFY=0 REFERENCE=0 RANKS=$ranks SHAPE=$merge_shape LAYERS=$merge_layers \
          BIN=$B bash bench/merge_bench.sh /tmp/bench-work 2>&1 | tee -a "$SUMMARY" || status=1
        rm -rf "/tmp/bench-work/merge-$merge_shape-$merge_layers"  # the next shape needs the disk
      done ;;
    *) echo "unknown stage '$stage'" >&2; status=2; exit ;;
  esac
  note "stage $stage: $(($(date +%s) - t)) s, status so far $status"
done
