#!/usr/bin/env bash
# Export benchmark (issue: Llama-3-8B-shaped, rank-16, all-linear LoRA at TP2xPP2):
# wall time and peak RSS per rank with 1, 2 and 4 ranks, beside the I/O floor (cat of the same
# .distcp bytes to /dev/null). Page cache warm for both. Prints a Markdown table.
#   bench/export_bench.sh [WORKDIR]   (default: bench/work; the checkpoint is made once, ~70 MB)
# Env: SHAPE=8b|70b|30b-a3b (70b: 80 layers, hidden 8192, ffn 28672, 64 heads, 8 KV heads, rank 64;
#      30b-a3b: Qwen3-30B-A3B, 48 layers, hidden 2048, 32 heads of 128, 4 KV heads, 128 experts of
#      ffn 768, top-8, rank-16 per-expert adapters, written at TP2 x EP4; deepseek-v3: see below, EXPERTS=N
#      to shrink its 256 experts; gpt-oss-120b: see below),
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
  deepseek-v3)
    # DeepSeek-V3's real dims (61 layers, hidden 7168, 128 heads, MLA q_lora 1536 / kv_lora 512 / nope 128 /
    # rope 64 / v 128, 3 dense layers of ffn 18432, experts of ffn 2048 top-8, one shared expert), rank-16
    # per-expert adapters on every linear, written at TP2 x EP8. EXPERTS (default 256) can shrink the expert
    # count. 256 experts are 9.7 GB of adapters: the generator's --lean keeps them in memory about once.
    dims=(--layers 61 --hidden 7168 --heads 128 --query-groups 128 --head-dim 128 --ffn 18432 --dim 16 --alpha 32)
    moe=(--experts "${EXPERTS:-256}" --expert-ffn 2048 --topk 8 --mla "1536,512,128,64,128" --first-dense-layers 3
         --shared-expert-ffn 2048 --per-layer-keys)
    layout=(--tp 2 --ep 8 --etp 1 --per-expert-adapters) ;;
  gpt-oss-120b)
    # GPT-OSS-120B's dims (36 layers, hidden 2880, 64 heads of 64, 8 KV heads, 128 experts of ffn 2880, top-4),
    # rank-16 per-expert adapters, written at TP2 x EP8: the experts go out in PEFT's ParamWrapper layout, lora_B
    # permuted expert-innermost (a copy, unlike every other tensor of the export).
    dims=(--layers 36 --hidden 2880 --heads 64 --query-groups 8 --head-dim 64 --ffn 2880 --dim 16 --alpha 32)
    moe=(--experts 128 --expert-ffn 2880 --topk 4)
    layout=(--tp 2 --ep 8 --etp 1 --per-expert-adapters) ;;
  *) echo "SHAPE must be 8b, 70b, 30b-a3b, deepseek-v3 or gpt-oss-120b" >&2; exit 2 ;;
esac
tag=$SHAPE${EXPERTS:+-e$EXPERTS}
ckpt=$WORK/$tag/megatron_ckpt
model=$WORK/$tag/hf_config
mkdir -p "$WORK/$tag"
if [[ ! -f $ckpt/latest_checkpointed_iteration.txt ]]; then
  # --lean: the same files, without holding every global tensor beside the chunks (see the generator's docstring)
  "$PYTHON" tests/fixtures/megatron_checkpoint.py --out "$ckpt" "${layout[@]}" "${dims[@]}" "${moe[@]}" \
    --no-expected --lean >/dev/null
fi
if [[ ! -f $model/config.json ]]; then
  # The export reads only config.json: no weights needed.
  "$PYTHON" - "$model" "$SHAPE" "${dims[@]}" "${moe[@]}" <<'PY'
import sys, transformers
out, shape, args = sys.argv[1], sys.argv[2], sys.argv[3:]
a = {k: int(v) for k, v in zip(args, args[1:]) if k.startswith("--") and v.lstrip("-").isdigit()}
common = dict(hidden_size=a["--hidden"], intermediate_size=a["--ffn"], num_hidden_layers=a["--layers"],
              num_attention_heads=a["--heads"], num_key_value_heads=a["--query-groups"], head_dim=a["--head-dim"],
              dtype="bfloat16")
if "--mla" in sys.argv:
    q, kv, nope, rope, v = (int(x) for x in sys.argv[sys.argv.index("--mla") + 1].split(","))
    transformers.DeepseekV3Config(
        vocab_size=129280, hidden_size=a["--hidden"], intermediate_size=a["--ffn"], num_hidden_layers=a["--layers"],
        num_attention_heads=a["--heads"], num_key_value_heads=a["--heads"], q_lora_rank=q, kv_lora_rank=kv,
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, n_routed_experts=a["--experts"],
        num_experts_per_tok=a["--topk"], moe_intermediate_size=a["--expert-ffn"], n_shared_experts=1,
        first_k_dense_replace=a["--first-dense-layers"], n_group=8, topk_group=4, dtype="bfloat16",
        architectures=["DeepseekV3ForCausalLM"]).save_pretrained(out)
elif shape.startswith("gpt-oss"):
    transformers.GptOssConfig(**common, vocab_size=201088, num_local_experts=a["--experts"],
                              num_experts_per_tok=a["--topk"], max_position_embeddings=131072,
                              architectures=["GptOssForCausalLM"]).save_pretrained(out)
elif "--experts" in a:
    transformers.Qwen3MoeConfig(**common, vocab_size=151936, num_experts=a["--experts"],
                                num_experts_per_tok=a["--topk"], moe_intermediate_size=a["--expert-ffn"],
                                architectures=["Qwen3MoeForCausalLM"]).save_pretrained(out)
else:
    transformers.LlamaConfig(**common, vocab_size=128256, architectures=["LlamaForCausalLM"]).save_pretrained(out)
PY
fi

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
now() { date +%s.%N; }
# Arithmetic on decimals with awk: the GPU image has no bc.
calc() { awk "BEGIN { print $1 }"; }

distcp=("$ckpt"/iter_*/__*.distcp)
bytes=$(cat "${distcp[@]}" | wc -c)
cat "${distcp[@]}" >/dev/null  # warm the page cache
floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >/dev/null; e=$(now); calc "$e - $s"; done | median)

# A second floor with the output side too: read the bytes, write as many, fsync them.
copy_floor=$(for _ in $(seq "$REPEAT"); do s=$(now); cat "${distcp[@]}" >"$WORK/$tag/copy"; sync "$WORK/$tag/copy"; e=$(now); calc "$e - $s"; done | median)
rm -f "$WORK/$tag/copy"

echo "| run | wall s (median of $REPEAT) | x read floor | in-job s (rank 0) | peak RSS per rank (MiB) |"
echo "|---|---:|---:|---:|---|"
echo "| floor: cat .distcp > /dev/null | $(printf %.4f "$floor") | 1.0 | - | - |"
echo "| floor: cat .distcp > file; sync | $(printf %.4f "$copy_floor") | $(printf %.1f "$(calc "$copy_floor / $floor")") | - | - |"
# The export alone: verification needs base weights, which this config-only model has not.
export_args=(export --hf-model-id "$model" --megatron-peft-checkpoint "$ckpt" --backend "$BACKEND" --no-verify)
# `direct`: one process started without mpirun (no MPI at all); N: mpirun -np N.
for n in direct $RANKS; do
  out=$WORK/$tag/out-$n
  walls=()
  jobs=()
  for _ in $(seq "$REPEAT"); do
    rm -rf "$out" "$WORK/$tag"/rss.*
    s=$(now)
    if [[ $n == direct ]]; then
      /usr/bin/time -f %M -o "$WORK/$tag/rss.0" "$BIN" "${export_args[@]}" --output-hf-path "$out" \
        --report "$WORK/$tag/report.json" >/dev/null
    else
      # shellcheck disable=SC2016  # expanded by the inner sh, per rank
      mpirun --oversubscribe -np "$n" sh -c 'exec /usr/bin/time -f %M -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
        "$WORK/$tag/rss" "$BIN" "${export_args[@]}" --output-hf-path "$out" \
        --report "$WORK/$tag/report.json" >/dev/null
    fi
    e=$(now)
    walls+=("$(calc "$e - $s")")
    jobs+=("$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"]["total"])' "$WORK/$tag/report.json")")
  done
  wall=$(printf '%s\n' "${walls[@]}" | median)
  job=$(printf '%s\n' "${jobs[@]}" | median)
  count=$([[ $n == direct ]] && echo 1 || echo "$n")
  rss=$(for r in $(seq 0 $((count - 1))); do echo $(( $(tail -1 "$WORK/$tag/rss.$r") / 1024 )); done | paste -sd, -)
  label=$([[ $n == direct ]] && echo "adapter_job export (1 process, no mpirun)" || echo "mpirun -np $n adapter_job export")
  echo "| $label | $(printf %.3f "$wall") | $(printf %.1f "$(calc "$wall / $floor")") | $(printf %.3f "$job") | $rss |"
done
echo
echo "checkpoint: $tag, $(( bytes / 1024 / 1024 )) MiB of .distcp in ${#distcp[@]} files; adapter $(du -b "$out/adapter_model.safetensors" | cut -f1) bytes"
