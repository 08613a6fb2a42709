#!/usr/bin/env bash
# Sets up and builds, makes the built-in demo (a tiny Llama and a TP2xPP2 LoRA checkpoint written
# in Megatron-Bridge's layout by four gloo ranks), then runs the export job on it with 4 MPI ranks.
# Everything lands in ./demo; re-running reuses the demo inputs and replaces the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

scripts/install.sh
ADAPTER_JOB_SKIP_INSTALL=1 scripts/build.sh >/dev/null
BIN=build/src/cli/adapter_job
DEMO=demo
mkdir -p "$DEMO"

if [[ ! -f $DEMO/hf_base/config.json ]]; then
  python3 tests/fixtures/tiny_llama.py --out "$DEMO/hf_base"
fi
if [[ ! -f $DEMO/megatron_ckpt/latest_checkpointed_iteration.txt ]]; then
  python3 tests/fixtures/megatron_checkpoint.py --out "$DEMO/megatron_ckpt" --tp 2 --pp 2 \
    --base-model "$DEMO/hf_base" --no-expected
fi

echo "== the checkpoint"
"$BIN" inspect "$DEMO/megatron_ckpt"
echo
echo "== mpirun -np 4 adapter_job export"
mpirun --oversubscribe -np 4 "$BIN" export \
  --hf-model-id "$DEMO/hf_base" \
  --megatron-peft-checkpoint "$DEMO/megatron_ckpt" \
  --output-hf-path "$DEMO/adapter" --overwrite --report "$DEMO/report.json"
echo
echo "== $DEMO/adapter"
ls -l "$DEMO/adapter"
