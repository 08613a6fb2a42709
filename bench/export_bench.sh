#!/usr/bin/env bash
# Export benchmark (issue: Llama-3-8B-shaped, rank-16, all-linear LoRA at TP2xPP2):
# wall time and peak RSS per rank with 1, 2 and 4 ranks, beside the I/O floor (cat of the same
# .distcp bytes to /dev/null). Page cache warm for both. Prints a Markdown table.
#   bench/export_bench.sh [WORKDIR]   (default: bench/work; the checkpoint is made once, ~70 MB)
# Env: SHAPE=8b|70b|30b-a3b (70b: 80 layers, hidden 8192, ffn 28672, 64 heads, 8 KV heads, rank 64;
#      30b-a3b: Qwen3-30B-A3B, 48 layers, hidden 2048, 32 heads of 128, 4 KV heads, 128 experts of
#      ffn 768, top-8, rank-16 per-expert adapters, written at TP2 x EP4),
#      RANKS="1 2 4", REPEAT=5, BACKEND=auto|mpi|nccl, BIN=build/src/cli/adapter_job.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=${1:-bench/work}
SHAPE=${SHAPE:-8b}
RANKS=${RANKS:-"1 2 4"}
REPEAT=${REPEAT:-5}
BACKEND=${BACKEND:-auto}
BIN=${BIN:-build/src/cli/adapter_job}
PYTHON=${PYTHON:-python3}

layout=(--tp 2 --pp 2)
moe=()
case $SHAPE in
  8b) dims=(--layers 32 --hidden 4096 --heads 32 --query-groups 8 --head-dim 128 --ffn 14336 --dim 16 --alpha 32) ;;
  70b) dims=(--layers 80 --hidden 8192 --heads 64 --query-groups 8 --head-dim 128 --ffn 28672 --dim 64 --alpha 128) ;;
  30b-a3b)
    dims=(--layers 48 --hidden 2048 --heads 32 --query-groups 4 --head-dim 128 --ffn 6144 --dim 16 --alpha 32)
    moe=(--experts 128 --expert-ffn 768 --topk 8)
    layout=(--tp 2 --ep 4 --etp 1 --per-expert-adapters) ;;
  *) echo "SHAPE must be 8b, 70b or 30b-a3b" >&2; exit 2 ;;
esac
ckpt=$WORK/$SHAPE/megatron_ckpt
model=$WORK/$SHAPE/hf_config
mkdir -p "$WORK/$SHAPE"
if [[ ! -f $ckpt/latest_checkpointed_iteration.txt ]]; then
  "$PYTHON" tests/fixtures/megatron_checkpoint.py --out "$ckpt" "${layout[@]}" "${dims[@]}" "${moe[@]}" \
    --no-expected >/dev/null
fi
if [[ ! -f $model/config.json ]]; then
  # The export reads only config.json: no weights needed.
  "$PYTHON" - "$model" "${dims[@]}" "${moe[@]}" <<'PY'
import sys, transformers
out, args = sys.argv[1], sys.argv[2:]
a = dict(zip(args[::2], map(int, args[1::2])))
common = dict(hidden_size=a["--hidden"], intermediate_size=a["--ffn"], num_hidden_layers=a["--layers"],
              num_attention_heads=a["--heads"], num_key_value_heads=a["--query-groups"], head_dim=a["--head-dim"],
              dtype="bfloat16")
if "--experts" in a:
    transformers.Qwen3MoeConfig(**common, vocab_size=151936, num_experts=a["--experts"],
                                num_experts_per_tok=a["--topk"], moe_intermediate_size=a["--expert-ffn"],
                                architectures=["Qwen3MoeForCausalLM"]).save_pretrained(out)
else:
    transformers.LlamaConfig(**common, vocab_size=128256, architectures=["LlamaForCausalLM"]).save_pretrained(out)
PY
fi

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }

distcp=("$ckpt"/iter_*/__*.distcp)
bytes=$(cat "${distcp[@]}" | wc -c)
cat "${distcp[@]}" >/dev/null  # warm the page cache
floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >/dev/null; e=$(now); echo "$e - $s" | bc -l; done | median)

# A second floor with the output side too: read the bytes, write as many, fsync them.
copy_floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >"$WORK/$SHAPE/copy"; sync "$WORK/$SHAPE/copy"; e=$(now); echo "$e - $s" | bc -l; done | median)
rm -f "$WORK/$SHAPE/copy"

echo "| run | wall s (median of $REPEAT) | x read floor | in-job s (rank 0) | peak RSS per rank (MiB) |"
echo "|---|---:|---:|---:|---|"
echo "| floor: cat .distcp > /dev/null | $(printf %.4f "$floor") | 1.0 | - | - |"
echo "| floor: cat .distcp > file; sync | $(printf %.4f "$copy_floor") | $(printf %.1f "$(echo "$copy_floor / $floor" | bc -l)") | - | - |"
# The export alone: verification needs base weights, which this config-only model has not.
export_args=(export --hf-model-id "$model" --megatron-peft-checkpoint "$ckpt" --backend "$BACKEND" --no-verify)
# `direct`: one process started without mpirun (no MPI at all); N: mpirun -np N.
for n in direct $RANKS; do
  out=$WORK/$SHAPE/out-$n
  walls=()
  jobs=()
  for _ in $(seq "$REPEAT"); do
    rm -rf "$out" "$WORK/$SHAPE"/rss.*
    s=$(now)
    if [[ $n == direct ]]; then
      /usr/bin/time -f %M -o "$WORK/$SHAPE/rss.0" "$BIN" "${export_args[@]}" --output-hf-path "$out" \
        --report "$WORK/$SHAPE/report.json" >/dev/null
    else
      # shellcheck disable=SC2016  # expanded by the inner sh, per rank
      mpirun --oversubscribe -np "$n" sh -c 'exec /usr/bin/time -f %M -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
        "$WORK/$SHAPE/rss" "$BIN" "${export_args[@]}" --output-hf-path "$out" \
        --report "$WORK/$SHAPE/report.json" >/dev/null
    fi
    e=$(now)
    walls+=("$(echo "$e - $s" | bc -l)")
    jobs+=("$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"]["total"])' "$WORK/$SHAPE/report.json")")
  done
  wall=$(printf '%s\n' "${walls[@]}" | median)
  job=$(printf '%s\n' "${jobs[@]}" | median)
  count=$([[ $n == direct ]] && echo 1 || echo "$n")
  rss=$(for r in $(seq 0 $((count - 1))); do echo $(( $(tail -1 "$WORK/$SHAPE/rss.$r") / 1024 )); done | paste -sd, -)
  label=$([[ $n == direct ]] && echo "adapter_job export (1 process, no mpirun)" || echo "mpirun -np $n adapter_job export")
  echo "| $label | $(printf %.3f "$wall") | $(printf %.1f "$(echo "$wall / $floor" | bc -l)") | $(printf %.3f "$job") | $rss |"
done
echo
echo "checkpoint: $SHAPE, $(( bytes / 1024 / 1024 )) MiB of .distcp in ${#distcp[@]} files; adapter $(du -b "$out/adapter_model.safetensors" | cut -f1) bytes"
