#!/usr/bin/env bash
# Post-training hook for pipeline schedulers (Airflow, Argo, Kubeflow, ...): one command, settings
# from the environment, a JSON result file out. It waits until the Megatron checkpoint is complete,
# exports and verifies its adapter, and records what it did. Re-running on the same checkpoint
# finds the adapter already made and does nothing.
#
# Environment (required):
#   ADAPTER_JOB_CHECKPOINT   Megatron save directory (with latest_checkpointed_iteration.txt) or an
#                            iter_* directory
#   ADAPTER_JOB_HF_MODEL     the HF base model directory (config.json, safetensors)
#   ADAPTER_JOB_OUTPUT       the PEFT adapter directory to write
# Environment (optional):
#   ADAPTER_JOB_RESULT       result JSON (default: $ADAPTER_JOB_OUTPUT.result.json)
#   ADAPTER_JOB_LAUNCHER     how to start the job: "" (one process, the default), or e.g.
#                            "mpirun -np 4" or "srun" (inside an allocation)
#   ADAPTER_JOB_ARGS         more `adapter_job export` options, e.g. "--dtype fp32 --verify-device cuda"
#   ADAPTER_JOB_WAIT_SECONDS how long to wait for a complete checkpoint (default 3600)
#   ADAPTER_JOB_POLL_SECONDS how often to look (default 10)
#   ADAPTER_JOB_OVERWRITE    1: replace an adapter made from another checkpoint (default 0: refuse)
#   ADAPTER_JOB_BIN          the adapter_job binary (default: on PATH, else this tree's build)
#
# A checkpoint is complete when latest_checkpointed_iteration.txt names an iteration whose
# directory has .metadata and metadata.json (Megatron writes both last), when no file in it changed
# between two looks, and, when Megatron wrote integrity.json, when every file it lists has the
# sha256 it records (a mismatch fails at once: the checkpoint is damaged, not unfinished).
#
# Exit codes (also in the result's "exit_code"):
#   0 exported and verified, or skipped because the adapter already matches the checkpoint
#   1 internal error   2 bad input (settings, checkpoint, integrity.json mismatch, output exists)
#   3 verification failed (the adapter is left in <output>.unverified)
#   4 infrastructure (checkpoint not complete in time, I/O errors, MPI failures)
set -uo pipefail

start=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)

json_string() {  # a JSON string literal for $1
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/\\r}
  printf '"%s"' "$s"
}
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'; }
say() { echo "adapter_job hook: $*" >&2; }

CKPT=${ADAPTER_JOB_CHECKPOINT:-}
HF=${ADAPTER_JOB_HF_MODEL:-}
OUT=${ADAPTER_JOB_OUTPUT:-}
RESULT=${ADAPTER_JOB_RESULT:-${OUT:+$OUT.result.json}}
WAIT=${ADAPTER_JOB_WAIT_SECONDS:-3600}
POLL=${ADAPTER_JOB_POLL_SECONDS:-10}
BIN=${ADAPTER_JOB_BIN:-$(command -v adapter_job || echo "$here/../build/src/cli/adapter_job")}

iter_dir='' iteration='' fingerprint='' integrity=absent wait_seconds=0 export_seconds=0 report=null
files_json="{}"

# Writes the result file (atomically) and exits with $1; $2 is the status, $3 the message.
finish() {
  local code=$1 status=$2 message=$3
  [[ $code -eq 0 ]] || say "$message"
  if [[ -n $RESULT ]]; then
    local tmp
    tmp=$(mktemp "$RESULT.XXXXXX" 2>/dev/null) || { say "cannot write the result file $RESULT"; exit "$code"; }
    cat >"$tmp" <<EOF
{
  "status": $(json_string "$status"),
  "exit_code": $code,
  "message": $(json_string "$message"),
  "checkpoint": {
    "path": $(json_string "$CKPT"),
    "iteration_dir": $(json_string "$iter_dir"),
    "iteration": $(json_string "$iteration"),
    "integrity": $(json_string "$integrity"),
    "fingerprint": $(json_string "$fingerprint")
  },
  "output": $(json_string "$OUT"),
  "files": $files_json,
  "seconds": {"wait": $wait_seconds, "export": $export_seconds, "total": $(elapsed "$start")},
  "export": $report
}
EOF
    mv -f "$tmp" "$RESULT"
  fi
  exit "$code"
}

[[ -n $CKPT && -n $HF && -n $OUT ]] ||
  finish 2 failed "ADAPTER_JOB_CHECKPOINT, ADAPTER_JOB_HF_MODEL and ADAPTER_JOB_OUTPUT must be set"
[[ $WAIT =~ ^[0-9]+$ && $POLL =~ ^[0-9]+$ ]] ||
  finish 2 failed "ADAPTER_JOB_WAIT_SECONDS and ADAPTER_JOB_POLL_SECONDS must be whole seconds"
[[ -x $BIN ]] || finish 2 failed "no adapter_job binary at '$BIN' (set ADAPTER_JOB_BIN)"

# Sets iter_dir and iteration, or `why` (not complete yet); exits at once on a damaged checkpoint.
why=
look() {
  why=
  if [[ -f $CKPT/latest_checkpointed_iteration.txt ]]; then
    iteration=$(tr -d '[:space:]' <"$CKPT/latest_checkpointed_iteration.txt")
    if [[ $iteration =~ ^[0-9]+$ ]]; then
      local digits=${iteration#"${iteration%%[!0]*}"}  # without leading zeros
      # bash arithmetic would wrap it (9223372036854775808 names iter_-9223372036854775808)
      if ((${#digits} > 19)) || [[ ${#digits} == 19 && $digits > 9223372036854775807 ]]; then
        finish 2 failed "$CKPT/latest_checkpointed_iteration.txt: iteration $iteration is beyond int64; expected at most 9223372036854775807"
      fi
      iter_dir=$CKPT/$(printf 'iter_%07d' "$((10#$iteration))")
    elif [[ $iteration == release ]]; then
      iter_dir=$CKPT/release
    else
      finish 2 failed "$CKPT/latest_checkpointed_iteration.txt: expected an iteration number, found '$iteration'"
    fi
  elif [[ -f $CKPT/.metadata ]]; then
    iter_dir=$CKPT
    iteration=$(basename "$CKPT")
  else
    why="no $CKPT/latest_checkpointed_iteration.txt yet"
    return
  fi
  if [[ ! -f $iter_dir/.metadata ]]; then why="no $iter_dir/.metadata yet"; return; fi
  if [[ ! -f $iter_dir/metadata.json ]]; then why="no $iter_dir/metadata.json yet"; return; fi
}

# name, size and modification time of every file of the iteration: unchanged between two looks
# means nobody is writing.
listing() { (cd "$iter_dir" && find . -maxdepth 1 -type f -printf '%P %s %T@\n' | sort); }

check_integrity() {
  [[ -f $iter_dir/integrity.json ]] || { integrity=absent; return; }
  local manifest
  manifest=$(tr -d '\n' <"$iter_dir/integrity.json")
  [[ $manifest =~ \"algorithm\"[[:space:]]*:[[:space:]]*\"sha256\" ]] ||
    finish 2 failed "$iter_dir/integrity.json: expected \"algorithm\": \"sha256\""
  local pairs name digest actual count=0
  pairs=$(grep -o '"[^"]*"[[:space:]]*:[[:space:]]*"[0-9a-fA-F]\{64\}"' <<<"$manifest" | tr -d ' "' | tr ':' ' ')
  while read -r name digest; do
    [[ -n $name ]] || continue
    [[ $name != */* && $name != .. ]] || finish 2 failed "$iter_dir/integrity.json: '$name' is not a plain file name"
    [[ -f $iter_dir/$name ]] || finish 2 failed "$iter_dir/integrity.json lists '$name', which is missing"
    actual=$(sha256sum "$iter_dir/$name" | cut -d' ' -f1)
    [[ ${actual,,} == "${digest,,}" ]] ||
      finish 2 failed "$iter_dir/$name does not match integrity.json: sha256 $actual, expected $digest"
    count=$((count + 1))
  done <<<"$pairs"
  ((count > 0)) || finish 2 failed "$iter_dir/integrity.json lists no files"
  integrity="verified ($count files)"
}

deadline=$(($(date +%s) + WAIT))
previous=
while true; do
  look
  if [[ -z $why ]]; then
    now_listing=$(listing)
    if [[ $now_listing == "$previous" ]]; then break; fi
    why=$([[ -z $previous ]] && echo "confirming that nothing still writes to $iter_dir" ||
          echo "files of $iter_dir still changing")
    previous=$now_listing
  else
    previous=
  fi
  if (($(date +%s) >= deadline)); then
    wait_seconds=$(elapsed "$start")
    finish 4 failed "checkpoint not complete after ${WAIT} s: $why"
  fi
  say "waiting: $why"
  # The first complete look is confirmed by a second one a moment later.
  if [[ -n $previous ]]; then sleep 1; else sleep "$POLL"; fi
done
wait_seconds=$(elapsed "$start")
check_integrity

# What identifies this checkpoint: the integrity manifest when there is one (every byte checked),
# else .metadata and the names and sizes of the iteration's files.
if [[ -f $iter_dir/integrity.json ]]; then
  fingerprint=$(sha256sum "$iter_dir/integrity.json" | cut -d' ' -f1)
else
  fingerprint=$( { sha256sum "$iter_dir/.metadata" | cut -d' ' -f1
                   (cd "$iter_dir" && find . -maxdepth 1 -type f -printf '%P %s\n' | sort); } | sha256sum | cut -d' ' -f1)
fi

adapter_files=(adapter_model.safetensors adapter_config.json)
hashes_json() {
  local first=1 name
  printf '{'
  for name in "${adapter_files[@]}"; do
    ((first)) || printf ', '
    first=0
    printf '%s: %s' "$(json_string "$name")" "$(json_string "$(sha256sum "$OUT/$name" | cut -d' ' -f1)")"
  done
  printf '}'
}

# Idempotent: the same checkpoint, an adapter whose files still have the recorded hashes: done.
if [[ -d $OUT && -f $RESULT ]] && grep -q "\"fingerprint\": \"$fingerprint\"" "$RESULT" &&
   grep -q '"exit_code": 0,' "$RESULT"; then
  current=$(hashes_json 2>/dev/null)
  if [[ -n $current ]] && grep -qF "\"files\": $current," "$RESULT"; then
    files_json=$current
    finish 0 skipped "the adapter in $OUT already matches this checkpoint"
  fi
fi

extra=()
if [[ -e $OUT ]]; then
  [[ ${ADAPTER_JOB_OVERWRITE:-0} == 1 ]] ||
    finish 2 failed "$OUT exists and was not made from this checkpoint (set ADAPTER_JOB_OVERWRITE=1 to replace it)"
  extra=(--overwrite)
fi

report_file=$(mktemp)
trap 'rm -f "$report_file"' EXIT
export_start=$(date +%s.%N)
# shellcheck disable=SC2086  # the launcher and the extra options are word lists by design
${ADAPTER_JOB_LAUNCHER:-} "$BIN" export --hf-model-id "$HF" --megatron-peft-checkpoint "$iter_dir" \
  --output-hf-path "$OUT" --report "$report_file" "${extra[@]}" ${ADAPTER_JOB_ARGS:-} >&2
code=$?
export_seconds=$(elapsed "$export_start")
[[ -s $report_file ]] && report=$(cat "$report_file")
case $code in
  0) files_json=$(hashes_json); finish 0 exported "exported and verified $OUT" ;;
  3) finish 3 failed "verification failed: the adapter is in $OUT.unverified, $OUT is unchanged" ;;
  2) finish 2 failed "adapter_job export rejected its input (exit 2; its message is above)" ;;
  1) finish 1 failed "adapter_job export failed with an internal error (exit 1)" ;;
  *) finish 4 failed "adapter_job export failed (exit $code): an I/O, MPI or system fault" ;;
esac
