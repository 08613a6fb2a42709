#!/usr/bin/env bash
# Post-training hook for pipeline schedulers (Airflow, Argo, Kubeflow, ...): one command, settings
# from the environment, a JSON result file out. It waits until the Megatron checkpoint is complete,
# exports and verifies its adapter (or, with ADAPTER_JOB_COMMAND=merge, writes and verifies the
# base model with the adapter merged in), and records what it did. Re-running on the same
# checkpoint finds the output already made and does nothing. This script only turns the
# environment into `adapter_job export|merge` options (--wait, --result, ...): the binary resolves
# and waits for the checkpoint, checks it, exports, and writes the result JSON. Needs bash and stat.
#
# Environment (required):
#   ADAPTER_JOB_CHECKPOINT   Megatron save directory (with latest_checkpointed_iteration.txt) or an
#                            iter_* directory
#   ADAPTER_JOB_HF_MODEL     the HF base model directory (config.json, safetensors)
#   ADAPTER_JOB_OUTPUT       the PEFT adapter directory to write (merge: the merged model's)
# Environment (optional):
#   ADAPTER_JOB_COMMAND      export (the default: a PEFT adapter) or merge (a full HF model with the
#                            adapter merged in, for serving without LoRA and for DoRA on vLLM);
#                            any other value: exit 2
#   ADAPTER_JOB_RESULT       result JSON (default: $ADAPTER_JOB_OUTPUT.result.json)
#   ADAPTER_JOB_LAUNCHER     how to start the job: "" (one process, the default), or e.g.
#                            "mpirun -np 4" or "srun" (inside an allocation)
#   ADAPTER_JOB_ARGS         more `adapter_job export|merge` options, e.g. "--verify-device cuda"
#                            (split at white space, never glob-expanded; the options the hook sets
#                            itself, --help and --print-config are refused)
#   ADAPTER_JOB_WAIT_SECONDS how long to wait for a complete checkpoint (default 3600; --wait)
#   ADAPTER_JOB_POLL_SECONDS how often to look while it is incomplete (default 10; --wait-poll)
#   ADAPTER_JOB_SETTLE_SECONDS how long its files must stay unchanged (default 10; --wait-settle)
#   ADAPTER_JOB_OVERWRITE    1: replace an output made from another checkpoint (default 0: refuse)
#   ADAPTER_JOB_BIN          the adapter_job binary (default: on PATH, else this tree's build)
#
# A checkpoint is complete when latest_checkpointed_iteration.txt names an iteration whose
# directory has .metadata and metadata.json (Megatron writes both last), and when the names, sizes
# and modification times of its files stay the same over ADAPTER_JOB_SETTLE_SECONDS, seen at least
# three times (`adapter_job export --wait`). adapter_job then checks integrity.json, when Megatron
# wrote one: every file it lists must have the sha256 it records (a mismatch fails at once: the
# checkpoint is damaged).
#
# Exit codes (also in the result's "exit_code"):
#   0 exported or merged (verified unless ADAPTER_JOB_ARGS said --no-verify: see "verified"), or
#     skipped because the output already matches the checkpoint. The result records the output's
#     files: sha256 of each, except a merged model's *.safetensors, recorded by size and
#     modification time (re-hashing hundreds of GB on every run would take minutes)
#   1 internal error   2 bad input (settings, checkpoint, integrity.json mismatch, output exists)
#   3 verification failed (the output is left in <output>.unverified)
#   4 infrastructure (checkpoint not complete in time, I/O errors, MPI failures, and a rank killed
#     by a signal, for which mpirun itself exits 128 + the signal, e.g. 137)
set -uo pipefail
set -f  # the settings are data: no word of them is ever a glob pattern

here=$(cd "$(dirname "$0")" && pwd)
say() { echo "adapter_job hook: $*" >&2; }

COMMAND=${ADAPTER_JOB_COMMAND:-export}
CKPT=${ADAPTER_JOB_CHECKPOINT:-}
HF=${ADAPTER_JOB_HF_MODEL:-}
OUT=${ADAPTER_JOB_OUTPUT:-}
RESULT=${ADAPTER_JOB_RESULT:-${OUT:+$OUT.result.json}}
BIN=${ADAPTER_JOB_BIN:-$(command -v adapter_job || echo "$here/../build/src/cli/adapter_job")}
read -r -d '' -a launcher <<<"${ADAPTER_JOB_LAUNCHER:-}"
read -r -d '' -a args <<<"${ADAPTER_JOB_ARGS:-}"

[[ -x $BIN ]] || { say "no adapter_job binary at '$BIN' (set ADAPTER_JOB_BIN): no result written"; exit 2; }

# Records a failure the binary did not see (it writes the JSON) and exits with that code.
fail() {
  local code=$1 message=$2
  if [[ -n $RESULT ]]; then
    "$BIN" "$COMMAND" --result "$RESULT" --megatron-peft-checkpoint "$CKPT" --output-hf-path "$OUT" \
      --record-failure "$message" --record-failure-code "$code" >/dev/null || true
  else
    say "$message"
  fi
  exit "$code"
}

# Checked first: the failure is recorded by the command, so it must be one.
if [[ $COMMAND != export && $COMMAND != merge ]]; then
  bad=$COMMAND COMMAND=export
  fail 2 "ADAPTER_JOB_COMMAND '$bad' is not export or merge"
fi
[[ -n $CKPT && -n $HF && -n $OUT ]] ||
  fail 2 "ADAPTER_JOB_CHECKPOINT, ADAPTER_JOB_HF_MODEL and ADAPTER_JOB_OUTPUT must be set"

# Options that would make the export do something else than export (Boost accepts any unique
# prefix of a long option, so prefixes count too), or that the hook sets itself.
for arg in "${args[@]}"; do
  name=${arg%%=*} why=
  if [[ $arg =~ ^-[a-zA-Z]*h ]]; then
    why="would print the help instead of exporting"
  elif [[ $name == --* && ${#name} -gt 2 ]]; then
    for reserved in --help --print-config --hf-model-id --megatron-peft-checkpoint --output-hf-path \
                    --report --overwrite --overwrite-hint --result --record-failure \
                    --record-failure-code --wait --wait-poll --wait-settle; do
      [[ $reserved == "$name"* ]] || continue
      case $reserved in
        --help | --print-config) why="would print instead of exporting" ;;
        --overwrite) why="is the hook's to set (ADAPTER_JOB_OVERWRITE=1)" ;;
        --wait*) why="is the hook's to set (ADAPTER_JOB_WAIT_SECONDS, _POLL_SECONDS, _SETTLE_SECONDS)" ;;
        *) why="is the hook's to set (ADAPTER_JOB_CHECKPOINT, ADAPTER_JOB_HF_MODEL, ADAPTER_JOB_OUTPUT, ADAPTER_JOB_RESULT)" ;;
      esac
      break
    done
  fi
  [[ -z $why ]] || fail 2 "ADAPTER_JOB_ARGS: '$arg' $why"
done

extra=()
[[ ${ADAPTER_JOB_OVERWRITE:-0} == 1 ]] && extra=(--overwrite)
# The result is replaced (a new file, renamed into place) by the run; the same one after it
# means the binary never got to write it.
before=$(stat -c %i -- "$RESULT" 2>/dev/null)
"${launcher[@]}" "$BIN" "$COMMAND" --hf-model-id "$HF" --megatron-peft-checkpoint "$CKPT" \
  --output-hf-path "$OUT" --result "$RESULT" --wait "${ADAPTER_JOB_WAIT_SECONDS:-3600}" \
  --wait-poll "${ADAPTER_JOB_POLL_SECONDS:-10}" --wait-settle "${ADAPTER_JOB_SETTLE_SECONDS:-10}" \
  --overwrite-hint "set ADAPTER_JOB_OVERWRITE=1" "${extra[@]}" "${args[@]}"
code=$?
# mpirun passes on 128 + the signal of a rank that was killed (the others are then ended by it).
if ((code > 128 && code <= 128 + 64)); then
  fail 4 "adapter_job $COMMAND failed (exit $code): a rank was killed by signal $((code - 128)) (9 is SIGKILL, e.g. from the out-of-memory killer)"
fi
after=$(stat -c %i -- "$RESULT" 2>/dev/null)
if ((code > 4)) || [[ -z $after || $after == "$before" ]]; then
  fail 4 "adapter_job $COMMAND failed (exit $code) without writing its result: the launcher or the system failed"
fi
exit "$code"
