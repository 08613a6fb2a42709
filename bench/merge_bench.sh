#!/usr/bin/env bash
# Merged-export benchmark (issue 14): `adapter_job merge` of a Llama-shaped bf16 model (random
# weights) with an all-linear LoRA or DoRA, beside the read+write floor (cat of the base's
# shards into one file, then sync) and the Python reference (transformers + PEFT
# merge_and_unload + save_pretrained, bench/reference_merge.py), run one after the other with the
# page cache as the previous run left it. Wall time and peak RSS of every process; the merge runs
# with --no-verify (the peers do not verify), then once more verifying on the CPU to show its cost.
# The floor and the merges are the median of REPEAT runs (this VM's disk varies run to run).
# Prints a Markdown table (with each rank's GPU buffers, from the merge's report, when it merges on
# a GPU; the CUDA context's few hundred MiB are not in that figure).
#   bench/merge_bench.sh [WORKDIR]   (default: bench/work)
# Env: SHAPE=8b|70b|1b|smoke, LAYERS (default: the shape's), KIND=lora|dora, RANK (LoRA rank,
#      default the shape's), RANKS="direct 2" (direct: one process without mpirun; N: mpirun -np N),
#      REFERENCE=1 (0 skips the Python reference), VERIFY=1, VERIFY_DEVICE=cpu|cuda|auto, REPEAT=3,
#      MERGE_DEVICE=auto|cpu|cuda (--merge-device),
#      BIN=build/src/cli/adapter_job.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=${1:-bench/work}
SHAPE=${SHAPE:-8b}
KIND=${KIND:-lora}
RANKS=${RANKS:-"direct 2"}
REFERENCE=${REFERENCE:-1}
VERIFY=${VERIFY:-1}
VERIFY_DEVICE=${VERIFY_DEVICE:-cpu}
MERGE_DEVICE=${MERGE_DEVICE:-auto}
REPEAT=${REPEAT:-3}
BIN=${BIN:-build/src/cli/adapter_job}
PYTHON=${PYTHON:-python3}

layers_arg=()
[[ -n ${LAYERS:-} ]] && layers_arg=(--layers "$LAYERS")
dir=$WORK/merge-$SHAPE-${LAYERS:-all}
base=$dir/base
ckpt=$dir/$KIND${RANK:+-r$RANK}/megatron_ckpt
adapter=$dir/$KIND${RANK:+-r$RANK}/adapter
mkdir -p "$dir"
if [[ ! -f $base/model.safetensors.index.json ]]; then
  "$PYTHON" bench/llama_shape.py --shape "$SHAPE" --out "$base" --weights "${layers_arg[@]}"
fi
if [[ ! -f $ckpt/latest_checkpointed_iteration.txt ]]; then
  read -ra dims <<<"$("$PYTHON" bench/llama_shape.py --shape "$SHAPE" --checkpoint-args)"
  [[ -n ${LAYERS:-} ]] && dims+=(--layers "$LAYERS")
  [[ -n ${RANK:-} ]] && dims+=(--dim "$RANK")
  "$PYTHON" tests/fixtures/megatron_checkpoint.py --out "$ckpt" --kind "$KIND" --base-model "$base" \
    "${dims[@]}" --no-expected >/dev/null
fi
if [[ ! -f $adapter/adapter_config.json ]]; then
  "$BIN" export --hf-model-id "$base" --megatron-peft-checkpoint "$ckpt" --output-hf-path "$adapter" \
    --no-verify --quiet
fi

now() { date +%s.%N; }
# Arithmetic on decimals with awk: the GPU image has no bc.
calc() { awk "BEGIN { print $1 }"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mib() { echo $(( $1 / 1024 / 1024 )); }
shards=("$base"/model-*.safetensors)
bytes=$(cat "${shards[@]}" | wc -c)

floor=$(for _ in $(seq "$REPEAT"); do
  s=$(now); cat "${shards[@]}" >"$dir/copy"; sync "$dir/copy"; e=$(now)
  rm -f "$dir/copy"
  calc "$e - $s"
done | median)

echo "| run | wall s | x floor | peak RSS per process (MiB) | GPU buffers per rank (MiB) |"
echo "|---|---:|---:|---|---|"
echo "| floor: cat base shards > file; sync (median of $REPEAT) | $(printf %.2f "$floor") | 1.0 | - | - |"
row() {  # label, wall, GPU buffers, rss files...
  local label=$1 wall=$2 gpu=$3
  shift 3
  local rss
  rss=$(for f in "$@"; do mib "$(( $(tail -1 "$f") * 1024 ))"; done | paste -sd, -)
  echo "| $label | $(printf %.2f "$wall") | $(printf %.2f "$(calc "$wall / $floor")") | $rss | $gpu |"
}
# Each rank's GPU buffers in MiB from a merge's report ("-" for ranks on the CPU).
gpu_buffers() {
  "$PYTHON" -c 'import json,sys; r=json.load(open(sys.argv[1]))["output_per_rank"]
print(",".join("-" if d == "cpu" else str(b >> 20) for d, b in zip(r["device"], r["gpu_bytes"])))' "$1"
}
merge_args=(merge --hf-model-id "$base" --megatron-peft-checkpoint "$ckpt" --quiet
            --merge-device "$MERGE_DEVICE")
for n in $RANKS; do
  out=$dir/merged-$n
  walls=()
  for _ in $(seq "$REPEAT"); do
    rm -rf "$out" "$dir"/rss.*
    s=$(now)
    if [[ $n == direct ]]; then
      /usr/bin/time -f %M -o "$dir/rss.0" "$BIN" "${merge_args[@]}" --output-hf-path "$out" --no-verify \
        --report "$dir/merge-report.json"
      files=("$dir/rss.0")
    else
      # shellcheck disable=SC2016  # expanded by the inner sh, per rank
      mpirun --oversubscribe -np "$n" sh -c 'exec /usr/bin/time -f %M -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
        "$dir/rss" "$BIN" "${merge_args[@]}" --output-hf-path "$out" --no-verify \
        --report "$dir/merge-report.json"
      files=("$dir"/rss.*)
    fi
    e=$(now)
    walls+=("$(calc "$e - $s")")
    rm -rf "$out"
  done
  label=$([[ $n == direct ]] && echo "adapter_job merge (1 process)" || echo "mpirun -np $n adapter_job merge")
  label+=", --merge-device $MERGE_DEVICE"
  row "$label, median of $REPEAT" "$(printf '%s\n' "${walls[@]}" | median)" \
    "$(gpu_buffers "$dir/merge-report.json")" "${files[@]}"
done
if [[ $VERIFY == 1 ]]; then
  out=$dir/merged-verified
  rm -rf "$out" "$out.unverified"
  s=$(now)
  /usr/bin/time -f %M -o "$dir/rss.v" "$BIN" "${merge_args[@]}" --output-hf-path "$out" \
    --verify-device "$VERIFY_DEVICE" --report "$dir/report.json"
  e=$(now)
  row "adapter_job merge, verified ($VERIFY_DEVICE, 1 process)" "$(calc "$e - $s")" \
    "$(gpu_buffers "$dir/report.json")" "$dir/rss.v"
  verify_s=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"]["verify"])' "$dir/report.json")
  echo "| (of which verification) | $(printf %.2f "$verify_s") | | | |"
  rm -rf "$out" "$out.unverified"
fi
if [[ $REFERENCE == 1 ]]; then
  out=$dir/reference
  rm -rf "$out"
  s=$(now)
  /usr/bin/time -f %M -o "$dir/rss.ref" "$PYTHON" bench/reference_merge.py "$base" "$adapter" "$out" >"$dir/reference.log" 2>"$dir/reference.err"
  sync "$out"/*
  e=$(now)
  row "Python: PEFT merge_and_unload + save_pretrained ($(cat "$dir/reference.log"))" "$(calc "$e - $s")" \
    - "$dir/rss.ref"
  rm -rf "$out"
fi
echo
echo "$SHAPE shape, ${LAYERS:-all} layers, $KIND rank ${RANK:-of the shape}: base $(mib "$bytes") MiB in ${#shards[@]} files; $(nproc) cores; $(date -u +%F)"
