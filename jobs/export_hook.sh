#!/usr/bin/env bash
# Post-training hook for pipeline schedulers (Airflow, Argo, Kubeflow, ...): one command, settings
# from the environment, a JSON result file out. It waits until the Megatron checkpoint is complete,
# exports and verifies its adapter, and records what it did. Re-running on the same checkpoint
# finds the adapter already made and does nothing. Needs bash, python3 (the JSON), find and sha256sum.
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
#                            (split at white space, never glob-expanded; the options the hook sets
#                            itself, --help and --print-config are refused)
#   ADAPTER_JOB_WAIT_SECONDS how long to wait for a complete checkpoint (default 3600)
#   ADAPTER_JOB_POLL_SECONDS how often to look while it is incomplete (default 10)
#   ADAPTER_JOB_SETTLE_SECONDS how long its files must stay unchanged (default 10)
#   ADAPTER_JOB_OVERWRITE    1: replace an adapter made from another checkpoint (default 0: refuse)
#   ADAPTER_JOB_BIN          the adapter_job binary (default: on PATH, else this tree's build)
#
# A checkpoint is complete when latest_checkpointed_iteration.txt names an iteration whose
# directory has .metadata and metadata.json (Megatron writes both last), and when the names, sizes
# and modification times of its files stay the same over ADAPTER_JOB_SETTLE_SECONDS, seen at least
# three times. adapter_job itself then checks integrity.json, when Megatron wrote one: every file
# it lists must have the sha256 it records (a mismatch fails at once: the checkpoint is damaged).
#
# Exit codes (also in the result's "exit_code"):
#   0 exported (verified unless ADAPTER_JOB_ARGS said --no-verify: see "verified"), or skipped
#     because the adapter already matches the checkpoint
#   1 internal error   2 bad input (settings, checkpoint, integrity.json mismatch, output exists)
#   3 verification failed (the adapter is left in <output>.unverified)
#   4 infrastructure (checkpoint not complete in time, I/O errors, MPI failures, and a rank killed
#     by a signal, for which mpirun itself exits 128 + the signal, e.g. 137)
set -uo pipefail
set -f  # the settings are data: no word of them is ever a glob pattern

start=$(date +%s.%N)
here=$(cd "$(dirname "$0")" && pwd)

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}'; }
say() { echo "adapter_job hook: $*" >&2; }

CKPT=${ADAPTER_JOB_CHECKPOINT:-}
HF=${ADAPTER_JOB_HF_MODEL:-}
OUT=${ADAPTER_JOB_OUTPUT:-}
RESULT=${ADAPTER_JOB_RESULT:-${OUT:+$OUT.result.json}}
WAIT=${ADAPTER_JOB_WAIT_SECONDS:-3600}
POLL=${ADAPTER_JOB_POLL_SECONDS:-10}
SETTLE=${ADAPTER_JOB_SETTLE_SECONDS:-10}
BIN=${ADAPTER_JOB_BIN:-$(command -v adapter_job || echo "$here/../build/src/cli/adapter_job")}
read -r -d '' -a launcher <<<"${ADAPTER_JOB_LAUNCHER:-}"
read -r -d '' -a args <<<"${ADAPTER_JOB_ARGS:-}"

iter_dir='' iteration='' fingerprint='' wait_seconds=0 export_seconds=0 report_file='' hashed=0

# The JSON side, in Python so that any path or message (control characters included) is encoded
# correctly. Values come in through the environment, never through the program text.
#   result FILE       writes the result JSON to FILE
#   same              exit 0 when $RESULT records a success for $R_FINGERPRINT and $OUT still has
#                     the adapter files it records
#   not-verified      prints why the export's report does not show a verified adapter (nothing
#                     when it does)
IFS= read -r -d '' PY_TOOL <<'PY'
import hashlib, json, os, sys

E = os.environ
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hashes():
    return {name: sha256(os.path.join(E["R_OUT"], name)) for name in ADAPTER_FILES}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def not_verified(report):
    """Why the report does not show a verified adapter; None when it does."""
    if not isinstance(report, dict):
        return "adapter_job wrote no report"
    if isinstance(report.get("verified"), bool):
        if report["verified"]:
            return None
        return report.get("verification_skipped") or "the report says verified: false without a reason"
    verification = report.get("verification")
    if isinstance(verification, dict) and verification.get("passed") is True:
        return None
    if report.get("verification_skipped"):
        return report["verification_skipped"]
    if "--no-verify" in E.get("R_ARGS", "").split():
        return "--no-verify"
    return "the report records no verification"


def integrity(report):
    checked = report.get("integrity") if isinstance(report, dict) else None
    if not isinstance(checked, dict):
        return E["R_INTEGRITY"]
    if checked.get("checked") is True:
        return f"verified ({checked.get('files')} files)"
    why = checked.get("why", "")
    return "absent" if "no integrity.json" in why else f"not checked: {why}"


def previous():
    result = load(E["R_RESULT"]) if E.get("R_RESULT") else None
    return result if isinstance(result, dict) else {}


def same():
    result = previous()
    try:
        return (result.get("exit_code") == 0
                and result.get("checkpoint", {}).get("fingerprint") == E["R_FINGERPRINT"]
                and result.get("files") == hashes())
    except OSError:
        return False


def write_result(path):
    status, code = E["R_STATUS"], int(E["R_CODE"])
    report = load(E["R_REPORT"]) if E.get("R_REPORT") else None
    result = {"status": status, "exit_code": code, "message": E["R_MESSAGE"]}
    checkpoint_integrity = integrity(report)
    if status == "skipped":  # what the run that made the adapter found
        before = previous()
        result["verified"] = before.get("verified") is True
        why = before.get("verification_skipped") or "the earlier result does not say it was verified"
        checkpoint_integrity = before.get("checkpoint", {}).get("integrity", checkpoint_integrity)
    else:
        why = not_verified(report) if code == 0 else None
        result["verified"] = code == 0 and why is None
    if not result["verified"] and why:
        result["verification_skipped"] = why
    result["checkpoint"] = {"path": E["R_CKPT"], "iteration_dir": E["R_ITER_DIR"],
                            "iteration": E["R_ITERATION"], "integrity": checkpoint_integrity,
                            "fingerprint": E["R_FINGERPRINT"]}
    result["output"] = E["R_OUT"]
    result["files"] = hashes() if E.get("R_HASHED") == "1" else {}
    result["seconds"] = {"wait": float(E["R_WAIT"]), "export": float(E["R_EXPORT"]),
                         "total": float(E["R_TOTAL"])}
    result["export"] = report
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if sys.argv[1] == "result":
    write_result(sys.argv[2])
elif sys.argv[1] == "same":
    sys.exit(0 if same() else 1)
elif sys.argv[1] == "not-verified":
    print(not_verified(load(E["R_REPORT"])) or "", end="")
PY

py() {
  R_CKPT=$CKPT R_ITER_DIR=$iter_dir R_ITERATION=$iteration R_FINGERPRINT=$fingerprint R_OUT=$OUT \
  R_RESULT=$RESULT R_REPORT=$report_file R_ARGS=${args[*]:-} R_INTEGRITY="not checked" \
    python3 -c "$PY_TOOL" "$@"
}

# Writes the result file (atomically) and exits with $1; $2 is the status, $3 the message.
finish() {
  local code=$1 status=$2 message=$3 tmp
  [[ $code -eq 0 ]] || say "$message"
  if [[ -n $RESULT ]]; then
    if tmp=$(mktemp "$RESULT.XXXXXX" 2>/dev/null) &&
       R_CODE=$code R_STATUS=$status R_MESSAGE=$message R_HASHED=$hashed R_WAIT=$wait_seconds \
       R_EXPORT=$export_seconds R_TOTAL=$(elapsed "$start") py result "$tmp"; then
      mv -f "$tmp" "$RESULT"
    else
      [[ -n ${tmp:-} ]] && rm -f "$tmp"
      say "cannot write the result file $RESULT"
    fi
  fi
  exit "$code"
}

[[ -n $CKPT && -n $HF && -n $OUT ]] ||
  finish 2 failed "ADAPTER_JOB_CHECKPOINT, ADAPTER_JOB_HF_MODEL and ADAPTER_JOB_OUTPUT must be set"
[[ $WAIT =~ ^[0-9]+$ && $POLL =~ ^[0-9]+$ && $SETTLE =~ ^[0-9]+$ ]] ||
  finish 2 failed "ADAPTER_JOB_WAIT_SECONDS, ADAPTER_JOB_POLL_SECONDS and ADAPTER_JOB_SETTLE_SECONDS must be whole seconds"
[[ -x $BIN ]] || finish 2 failed "no adapter_job binary at '$BIN' (set ADAPTER_JOB_BIN)"
command -v python3 >/dev/null || finish 2 failed "the hook needs python3 to write its result"

# Options that would make the export do something else than export (Boost accepts any unique
# prefix of a long option, so prefixes count too), or that the hook sets itself.
for arg in "${args[@]}"; do
  name=${arg%%=*} why=
  if [[ $arg =~ ^-[a-zA-Z]*h ]]; then
    why="would print the help instead of exporting"
  elif [[ $name == --* && ${#name} -gt 2 ]]; then
    for reserved in --help --print-config --hf-model-id --megatron-peft-checkpoint --output-hf-path \
                    --report --overwrite; do
      [[ $reserved == "$name"* ]] || continue
      case $reserved in
        --help | --print-config) why="would print instead of exporting" ;;
        --overwrite) why="is the hook's to set (ADAPTER_JOB_OVERWRITE=1)" ;;
        *) why="is the hook's to set (ADAPTER_JOB_CHECKPOINT, ADAPTER_JOB_HF_MODEL, ADAPTER_JOB_OUTPUT)" ;;
      esac
      break
    done
  fi
  [[ -z $why ]] || finish 2 failed "ADAPTER_JOB_ARGS: '$arg' $why"
done

# Sets iter_dir and iteration, or `why` (not complete yet).
why=
look() {
  why=
  if [[ -f $CKPT/latest_checkpointed_iteration.txt ]]; then
    iteration=$(tr -d '[:space:]' <"$CKPT/latest_checkpointed_iteration.txt")
    if [[ $iteration =~ ^[0-9]+$ ]]; then
      local digits=${iteration#"${iteration%%[!0]*}"}  # without leading zeros
      # bash arithmetic would wrap it (9223372036854775808 names iter_-9223372036854775808); digit
      # strings of one length compare as numbers
      # shellcheck disable=SC2071
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

# The iteration, and the name, size and modification time of each of its files: unchanged over
# the settle time means nobody is writing. (One second was not enough: a writer that pauses
# between shards, or flushes large buffers, looks finished for that long.)
listing() { printf '%s\n' "$iter_dir"; (cd "$iter_dir" && find . -maxdepth 1 -type f -printf '%P %s %T@\n' | sort); }

deadline=$(($(date +%s) + WAIT))
step=$(awk -v s="$SETTLE" 'BEGIN {printf "%.3f", s / 3}')
previous='' stable_since='' looks=0 said=''
while true; do
  look
  if [[ -z $why ]]; then
    now_listing=$(listing)
    if [[ $now_listing != "$previous" ]]; then
      why=$([[ -z $previous ]] && echo "confirming for ${SETTLE} s that nothing still writes to $iter_dir" ||
            echo "files of $iter_dir still changing")
      previous=$now_listing stable_since=$(date +%s.%N) looks=1
    else
      looks=$((looks + 1))
      if ((looks >= 3)) && awk -v e="$(elapsed "$stable_since")" -v s="$SETTLE" 'BEGIN {exit !(e >= s)}'; then
        break
      fi
      why="confirming for ${SETTLE} s that nothing still writes to $iter_dir"
    fi
  else
    previous=''
  fi
  if (($(date +%s) >= deadline)); then
    wait_seconds=$(elapsed "$start")
    finish 4 failed "checkpoint not complete after ${WAIT} s: $why"
  fi
  [[ $why == "$said" ]] || say "waiting: $why"
  said=$why
  if [[ -n $previous ]]; then sleep "$step"; else sleep "$POLL"; fi
done
wait_seconds=$(elapsed "$start")

# What identifies this checkpoint: the integrity manifest when there is one (every byte checked),
# else .metadata and the names and sizes of the iteration's files.
if [[ -f $iter_dir/integrity.json ]]; then
  fingerprint=$(sha256sum "$iter_dir/integrity.json" | cut -d' ' -f1)
else
  fingerprint=$( { sha256sum "$iter_dir/.metadata" | cut -d' ' -f1
                   (cd "$iter_dir" && find . -maxdepth 1 -type f -printf '%P %s\n' | sort); } | sha256sum | cut -d' ' -f1)
fi

# Idempotent: the same checkpoint, an adapter whose files still have the recorded hashes: done.
if [[ -d $OUT && -f $RESULT ]] && py same; then
  hashed=1
  finish 0 skipped "the adapter in $OUT already matches this checkpoint"
fi

extra=()
if [[ -e $OUT ]]; then
  [[ ${ADAPTER_JOB_OVERWRITE:-0} == 1 ]] ||
    finish 2 failed "$OUT exists and was not made from this checkpoint (set ADAPTER_JOB_OVERWRITE=1 to replace it)"
  extra=(--overwrite)
fi

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
report_file=$scratch/report.json
export_start=$(date +%s.%N)
# Its output goes to our stderr, and to a log whose error line becomes the result's message.
"${launcher[@]}" "$BIN" export --hf-model-id "$HF" --megatron-peft-checkpoint "$iter_dir" \
  --output-hf-path "$OUT" --report "$report_file" "${extra[@]}" "${args[@]}" 2>&1 |
  tee "$scratch/log" >&2
code=${PIPESTATUS[0]}
export_seconds=$(elapsed "$export_start")
error=$(grep -m1 'error: ' "$scratch/log" | sed -E 's/^([^:]*: )?error: //')
# mpirun passes on 128 + the signal of a rank that was killed (the others are then ended by it).
if ((code > 128 && code <= 128 + 64)); then
  finish 4 failed "adapter_job export failed (exit $code): a rank was killed by signal $((code - 128)) (9 is SIGKILL, e.g. from the out-of-memory killer)${error:+; $error}"
fi
case $code in
  0)
    # Exit 0 with no report means that something (a --config file) asked for --help or
    # --print-config: nothing was exported.
    [[ -s $report_file && -f $OUT/adapter_model.safetensors ]] ||
      finish 2 failed "adapter_job export exited 0 but exported nothing to $OUT (does a --config file ask for help or print-config?)"
    hashed=1
    not_verified=$(py not-verified)
    if [[ -z $not_verified ]]; then
      finish 0 exported "exported and verified $OUT"
    else
      finish 0 exported "exported $OUT; verification skipped: $not_verified"
    fi ;;
  3) finish 3 failed "verification failed: the adapter is in $OUT.unverified, $OUT is unchanged" ;;
  2) finish 2 failed "adapter_job export rejected its input (exit 2): ${error:-its message is above}" ;;
  1) finish 1 failed "adapter_job export failed with an internal error (exit 1)${error:+: $error}" ;;
  *) finish 4 failed "adapter_job export failed (exit $code): an I/O, MPI or system fault${error:+: $error}" ;;
esac
