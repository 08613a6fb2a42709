#!/usr/bin/env bash
# GPU benchmarks (issue 5), each beside its floor and its Python reference, run in one go:
#   export  Llama-3-8B-shaped rank-16 and 70B-shaped rank-64 all-linear LoRA at TP2xPP2, `mpirun -np 4`
#           over NCCL (a GPU per rank) and over MPI; floor: reading the .distcp bytes once (cat), and
#           with the output written and fsynced; reference: bench/reference_export.py.
#   verify  8B-shaped model on one GPU: `adapter_job verify` with the Megatron checkpoint; floor:
#           bench/read_h2d_floor.py (base weights read once + host-to-device copy); reference:
#           bench/reference_verify.py (transformers + peft + merged float32 forward).
# Page cache warm for every run. Peak host memory per process from getrusage (the job's report, or
# bench/peak_rss.py); peak GPU memory per process from nvidia-smi, sampled every 20 ms.
#
#   bench/gpu_bench.sh [export|verify|all]
# Env: BIN (build-gpu/src/cli/adapter_job), WORK (bench/work), RESULTS (bench/results: Markdown
#      tables and raw JSON), SHAPES ("8b 70b"), VERIFY_SHAPE (8b), REPEAT (3), REPEAT_REF (2),
#      RANKS (4), DEVICE (cuda; cpu with BACKEND=mpi tries the scripts on a machine without GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
WHAT=${1:-all}
BIN=${BIN:-build-gpu/src/cli/adapter_job}
WORK=${WORK:-bench/work}
RESULTS=${RESULTS:-bench/results}
SHAPES=${SHAPES:-"8b 70b"}
VERIFY_SHAPE=${VERIFY_SHAPE:-8b}
REPEAT=${REPEAT:-3}
REPEAT_REF=${REPEAT_REF:-2}
RANKS=${RANKS:-4}
DEVICE=${DEVICE:-cuda}
BACKENDS=${BACKENDS:-"nccl mpi"}
PYTHON=${PYTHON:-python3}
mkdir -p "$WORK" "$RESULTS"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }
calc() { awk "BEGIN {printf \"%.6f\\n\", $1}"; }  # bc is not on every image
ratio() { printf %.1f "$(calc "$1 / $2")"; }
json() { "$PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d=d[int(k)] if isinstance(d, list) else d[k]
print(d if not isinstance(d, list) else ",".join(map(str, d)))' "$1" "$2"; }
json_line() { "$PYTHON" -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$1" "$2"; }
mib() { tr , '\n' | awk '{printf "%s%d", (NR>1 ? "," : ""), $1 / 1048576}'; }

# Samples every process's GPU memory until stopped; writes the peak per pid (MiB), sorted by pid.
gpu_sampler_start() {
  local file=$1
  : >"$file.raw"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits -lms 20 >"$file.raw" 2>/dev/null &
    SAMPLER=$!
  else
    SAMPLER=
  fi
}
gpu_sampler_stop() {
  local file=$1
  [[ -n $SAMPLER ]] && { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; }
  awk -F', *' 'NF == 2 && $2 + 0 > peak[$1] {peak[$1] = $2 + 0} END {for (p in peak) print p, peak[p]}' \
    "$file.raw" | sort -n | awk '{printf "%s%d", (NR>1 ? "," : ""), $2}' >"$file"
  [[ -s $file ]] || echo -n "-" >"$file"
}

prepare_shape() {  # $1 shape; $2 "weights" for a base with weights
  local shape=$1 dir=$WORK/$1
  if [[ ! -f $dir/megatron_ckpt/latest_checkpointed_iteration.txt ]]; then
    # shellcheck disable=SC2046  # the shape's dims are separate arguments
    "$PYTHON" tests/fixtures/megatron_checkpoint.py --out "$dir/megatron_ckpt" --tp 2 --pp 2 --no-expected \
      $("$PYTHON" bench/llama_shape.py --shape "$shape" --checkpoint-args) >/dev/null
  fi
  if [[ ${2:-} == weights && ! -f $dir/hf/model.safetensors.index.json ]]; then
    "$PYTHON" bench/llama_shape.py --shape "$shape" --out "$dir/hf" --weights
  elif [[ ! -f $dir/hf/config.json ]]; then
    "$PYTHON" bench/llama_shape.py --shape "$shape" --out "$dir/hf"
  fi
}

export_bench() {
  local shape=$1 dir=$WORK/$1
  prepare_shape "$shape"
  local ckpt=$dir/megatron_ckpt distcp=("$dir"/megatron_ckpt/iter_*/__*.distcp)
  local table=$RESULTS/export-$shape.md
  local bytes floor copy_floor
  bytes=$(cat "${distcp[@]}" | wc -c)
  floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >/dev/null; e=$(now); calc "$e - $s"; done | median)
  copy_floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >"$dir/copy"; sync "$dir/copy"; e=$(now); calc "$e - $s"; done | median)
  rm -f "$dir/copy"
  {
    echo "| run | wall s (median of $REPEAT) | x read floor | in-job s (rank 0) | peak host RSS per rank (MiB) | peak GPU memory per process (MiB) |"
    echo "|---|---:|---:|---:|---|---|"
    echo "| floor: cat .distcp > /dev/null | $(printf %.3f "$floor") | 1.0 | - | - | - |"
    echo "| floor: cat .distcp > file; sync | $(printf %.3f "$copy_floor") | $(ratio "$copy_floor" "$floor") | - | - | - |"
  } >"$table"
  local ours_best=
  for backend in $BACKENDS; do
    local out=$dir/out-$backend walls=() jobs=()
    for i in $(seq "$REPEAT"); do
      rm -rf "$out"
      [[ $i == 1 ]] && gpu_sampler_start "$dir/gpu-$backend"
      s=$(now)
      mpirun --oversubscribe -np "$RANKS" -x NCCL_NVLS_ENABLE "$BIN" export --hf-model-id "$dir/hf" \
        --megatron-peft-checkpoint "$ckpt" --output-hf-path "$out" --backend "$backend" --no-verify \
        --report "$RESULTS/export-$shape-$backend.json" >"$dir/log-$backend" 2>&1
      e=$(now)
      [[ $i == 1 ]] && gpu_sampler_stop "$dir/gpu-$backend"
      walls+=("$(calc "$e - $s")")
      jobs+=("$(json "$RESULTS/export-$shape-$backend.json" seconds.total)")
    done
    local wall job
    wall=$(printf '%s\n' "${walls[@]}" | median)
    job=$(printf '%s\n' "${jobs[@]}" | median)
    [[ -z $ours_best ]] && ours_best=$wall
    echo "| adapter_job export, mpirun -np $RANKS, $backend backend | $(printf %.3f "$wall") | $(ratio "$wall" "$floor") | $(printf %.3f "$job") | $(json "$RESULTS/export-$shape-$backend.json" peak_rss_bytes_per_rank | mib) | $(cat "$dir/gpu-$backend") |" >>"$table"
  done
  # What the launcher alone costs, and the same export as one process without it.
  local launch direct_walls=()
  launch=$(for _ in $(seq "$REPEAT"); do s=$(now); mpirun --oversubscribe -np "$RANKS" true; e=$(now); calc "$e - $s"; done | median)
  for _ in $(seq "$REPEAT"); do
    rm -rf "$dir/out-direct"
    s=$(now)
    "$BIN" export --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$ckpt" --output-hf-path "$dir/out-direct" \
      --no-verify --report "$RESULTS/export-$shape-direct.json" >"$dir/log-direct" 2>&1
    e=$(now)
    direct_walls+=("$(calc "$e - $s")")
  done
  local direct
  direct=$(printf '%s\n' "${direct_walls[@]}" | median)
  {
    echo "| launcher alone: mpirun -np $RANKS true | $(printf %.3f "$launch") | - | - | - | - |"
    echo "| adapter_job export, 1 process (no mpirun) | $(printf %.3f "$direct") | $(ratio "$direct" "$floor") | $(printf %.3f "$(json "$RESULTS/export-$shape-direct.json" seconds.total)") | $(json "$RESULTS/export-$shape-direct.json" peak_rss_bytes_per_rank | mib) | - |"
  } >>"$table"
  local ref_walls=()
  for _ in $(seq "$REPEAT_REF"); do
    rm -rf "$dir/out-ref"
    s=$(now)
    "$PYTHON" bench/reference_export.py --hf-model "$dir/hf" --checkpoint "$ckpt" --out "$dir/out-ref" \
      >"$RESULTS/export-$shape-reference.json" 2>"$dir/log-reference"
    e=$(now)
    ref_walls+=("$(calc "$e - $s")")
  done
  local ref same
  ref=$(printf '%s\n' "${ref_walls[@]}" | median)
  same=$(cmp -s "$dir/out-ref/adapter_model.safetensors" "$dir/out-$(echo "$BACKENDS" | cut -d' ' -f1)/adapter_model.safetensors" && echo "byte-identical" || echo "DIFFERENT")
  echo "| reference: bench/reference_export.py (torch DCP load, convert, save_file; 1 process) | $(printf %.3f "$ref") | $(ratio "$ref" "$floor") | $(printf %.3f "$(json_line "$RESULTS/export-$shape-reference.json" total_in_process)") | $(( $(json_line "$RESULTS/export-$shape-reference.json" peak_rss_bytes) / 1048576 )) | - |" >>"$table"
  {
    echo
    echo "Checkpoint: $shape, $((bytes / 1048576)) MiB of .distcp in ${#distcp[@]} files; adapter $(stat -c %s "$dir/out-ref/adapter_model.safetensors") bytes."
    echo "Reference output vs ours: $same. Reference / ours (first backend): $(ratio "$ref" "$ours_best")x."
  } >>"$table"
  cat "$table"
}

verify_bench() {
  local shape=$VERIFY_SHAPE dir=$WORK/$VERIFY_SHAPE
  prepare_shape "$shape" weights
  local adapter=$dir/adapter table=$RESULTS/verify-$shape.md
  if [[ ! -f $adapter/adapter_model.safetensors ]]; then
    "$BIN" export --hf-model-id "$dir/hf" --megatron-peft-checkpoint "$dir/megatron_ckpt" \
      --output-hf-path "$adapter" --no-verify >/dev/null
  fi
  local weights=("$dir"/hf/*.safetensors) bytes read floors=() walls=() jobs=() ref_walls=()
  bytes=$(cat "${weights[@]}" | wc -c)
  cat "${weights[@]}" >/dev/null  # warm the page cache
  read=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${weights[@]}" >/dev/null; e=$(now); calc "$e - $s"; done | median)
  if [[ $DEVICE == cuda ]]; then
    for _ in $(seq "$REPEAT"); do
      "$PYTHON" bench/read_h2d_floor.py "$dir/hf" >"$RESULTS/verify-$shape-floor.json"
      floors+=("$(calc "$(json_line "$RESULTS/verify-$shape-floor.json" cuda_init) + $(json_line "$RESULTS/verify-$shape-floor.json" read_h2d)")")
    done
  else
    floors=("$read")
  fi
  local floor
  floor=$(printf '%s\n' "${floors[@]}" | median)
  for i in $(seq "$REPEAT"); do
    [[ $i == 1 ]] && gpu_sampler_start "$dir/gpu-verify"
    s=$(now)
    "$PYTHON" bench/peak_rss.py "$RESULTS/verify-$shape-ours-rss.txt" "$BIN" verify --hf-model-id "$dir/hf" \
      --hf-adapter-path "$adapter" --megatron-peft-checkpoint "$dir/megatron_ckpt" --verify-device "$DEVICE" \
      --report "$RESULTS/verify-$shape-ours.json" >"$dir/log-verify" 2>&1 || { cat "$dir/log-verify"; return 1; }
    e=$(now)
    [[ $i == 1 ]] && gpu_sampler_stop "$dir/gpu-verify"
    walls+=("$(calc "$e - $s")")
    jobs+=("$(json "$RESULTS/verify-$shape-ours.json" seconds)")
  done
  for i in $(seq "$REPEAT_REF"); do
    [[ $i == 1 ]] && gpu_sampler_start "$dir/gpu-reference"
    s=$(now)
    "$PYTHON" bench/reference_verify.py --hf-model "$dir/hf" --adapter "$adapter" --checkpoint "$dir/megatron_ckpt" \
      --device "$DEVICE" >"$RESULTS/verify-$shape-reference.json" 2>"$dir/log-reference-verify"
    e=$(now)
    [[ $i == 1 ]] && gpu_sampler_stop "$dir/gpu-reference"
    ref_walls+=("$(calc "$e - $s")")
  done
  local wall job ref
  wall=$(printf '%s\n' "${walls[@]}" | median)
  job=$(printf '%s\n' "${jobs[@]}" | median)
  ref=$(printf '%s\n' "${ref_walls[@]}" | median)
  {
    echo "| run | wall s (median) | x floor | in-process s | result | peak host RSS (MiB) | peak GPU memory (MiB) |"
    echo "|---|---:|---:|---:|---|---:|---:|"
    echo "| floor: cat of the weights > /dev/null | $(printf %.3f "$read") | $(ratio "$read" "$floor") | - | - | - | - |"
    [[ $DEVICE == cuda ]] && echo "| floor: CUDA start + read once + host-to-device copy (bench/read_h2d_floor.py) | $(printf %.3f "$floor") | 1.0 | - | - | - | - |"
    echo "| adapter_job verify (base, PEFT, Megatron-merged; $DEVICE) | $(printf %.3f "$wall") | $(ratio "$wall" "$floor") | $(printf %.3f "$job") | $( [[ $(json "$RESULTS/verify-$shape-ours.json" passed) == True ]] && echo PASSED || echo FAILED) | $(( $(cat "$RESULTS/verify-$shape-ours-rss.txt") / 1048576 )) | $(cat "$dir/gpu-verify") |"
    echo "| reference: bench/reference_verify.py (transformers + peft + merged fp32) | $(printf %.3f "$ref") | $(ratio "$ref" "$floor") | $(printf %.3f "$(json_line "$RESULTS/verify-$shape-reference.json" seconds.total_in_process)") | $( [[ $(json_line "$RESULTS/verify-$shape-reference.json" passed) == True ]] && echo PASSED || echo FAILED) | $(( $(json_line "$RESULTS/verify-$shape-reference.json" peak_rss_bytes) / 1048576 )) | $(cat "$dir/gpu-reference") |"
    echo
    echo "Base model: $shape, $((bytes / 1048576)) MiB of bf16 safetensors in ${#weights[@]} files. Reference / ours: $(ratio "$ref" "$wall")x."
  } >"$table"
  cat "$table"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "host: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%d GiB", $2 / 1048576}' /proc/meminfo)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | sort | uniq -c
  "$BIN" version
} >"$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"
case $WHAT in
  export) for shape in $SHAPES; do export_bench "$shape"; done ;;
  verify) verify_bench ;;
  all) for shape in $SHAPES; do export_bench "$shape"; done; verify_bench ;;
  *) echo "usage: bench/gpu_bench.sh [export|verify|all]" >&2; exit 2 ;;
esac
