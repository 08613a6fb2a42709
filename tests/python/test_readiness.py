"""`adapter_job export --wait` and `--result`: the checkpoint readiness and the result file that jobs/export_hook.sh
had in bash and Python, now in the binary. Checked against the files themselves, hashlib, and the export's own
--report; the result's schema is the one the hook has always written."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from test_export_bad_input import writable_copy

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
CKPT = "tp2pp2/lora/megatron_ckpt"
MB_ADAPTER = "tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# The keys the hook's result has always had (test_hook.py reads them through the hook).
RESULT_KEYS = {"status", "exit_code", "message", "verified", "checkpoint", "output", "files", "seconds", "export"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(adapter_job_bin, hf, ckpt, out, *args, np=None, timeout=120):
    launcher = [] if np is None else [*MPIRUN, "-np", str(np)]
    cmd = [*launcher, adapter_job_bin, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt,
           "--output-hf-path", out, *args]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def write_integrity(iter_dir: Path) -> dict:
    files = {p.name: sha256(p) for p in sorted(iter_dir.iterdir()) if p.is_file() and p.name != "integrity.json"}
    (iter_dir / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    return files


def listing(directory: Path) -> set:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def test_an_iteration_that_appears_later_is_waited_for_and_exported(adapter_job_bin, mb_fixtures, tmp_path):
    """The save directory starts empty; the iteration's files come one by one, metadata.json and then
    latest_checkpointed_iteration.txt last, as Megatron writes them."""
    src = mb_fixtures / CKPT
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    done = []

    def write_later():
        time.sleep(1.5)
        iter_src = next(src.glob("iter_*"))
        dst = ckpt / iter_src.name
        dst.mkdir()
        for f in sorted(iter_src.iterdir(), key=lambda p: p.name == "metadata.json"):
            shutil.copy(f, dst / f.name)
            time.sleep(0.2)
        shutil.copy(src / "latest_checkpointed_iteration.txt", ckpt / "latest_checkpointed_iteration.txt")
        done.append(time.monotonic())

    writer = threading.Thread(target=write_later)
    writer.start()
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--wait", "120", "--wait-poll", "0.2",
                  "--wait-settle", "1", "--result", result_file, "--no-verify")
    writer.join()
    assert proc.returncode == 0, proc.stderr
    assert "waiting: no " in proc.stderr and "latest_checkpointed_iteration.txt yet" in proc.stderr, proc.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == (mb_fixtures / MB_ADAPTER).read_bytes()
    result = json.loads(result_file.read_text())
    assert result["status"] == "exported" and result["exit_code"] == 0
    assert result["checkpoint"]["iteration_dir"] == str(ckpt / "iter_0000001")
    assert result["checkpoint"]["iteration"] == "1"
    # It waited for the last file, and at least the settle time after the first complete look.
    assert done and result["seconds"]["wait"] >= 1


def test_a_timeout_exits_4_and_writes_nothing(adapter_job_bin, mb_fixtures, tmp_path):
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    (iter_dir / "metadata.json").unlink()  # Megatron writes it when the save is finalised
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    out = outputs / "adapter"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--wait", "1", "--wait-poll", "0.2",
                  "--no-verify")
    assert proc.returncode == 4, proc.stderr
    assert f"checkpoint not complete after 1 s: no {iter_dir / 'metadata.json'} yet" in proc.stderr, proc.stderr
    assert listing(outputs) == set()

    # With --result, the failure is the one file written.
    result_file = outputs / "result.json"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--wait", "1", "--wait-poll", "0.2",
                  "--no-verify", "--result", result_file)
    assert proc.returncode == 4, proc.stderr
    assert listing(outputs) == {"result.json"}
    result = json.loads(result_file.read_text())
    assert result["status"] == "failed" and result["exit_code"] == 4 and result["verified"] is False
    assert "checkpoint not complete after 1 s" in result["message"] and "metadata.json yet" in result["message"]
    assert result["files"] == {} and result["export"] is None


def test_a_marker_that_is_no_iteration_fails_at_once(adapter_job_bin, mb_fixtures, tmp_path):
    """Waiting cannot mend it: exit 2, not a wait until the timeout (an hour in the hook)."""
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("-3\n")
    out = tmp_path / "adapter"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--wait", "3600", "--no-verify", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "expected an iteration number" in proc.stderr and "'-3'" in proc.stderr, proc.stderr
    assert not out.exists()


def test_a_wrong_sha256_in_integrity_json_is_refused(adapter_job_bin, mb_fixtures, tmp_path):
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    files = write_integrity(iter_dir)
    wrong = hashlib.sha256(b"not the shard").hexdigest()
    files["__2_0.distcp"] = wrong
    (iter_dir / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--wait", "60", "--wait-poll", "0.2",
                  "--wait-settle", "0.5", "--result", result_file, "--no-verify")
    assert proc.returncode == 2, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["status"] == "failed" and result["exit_code"] == 2
    assert "__2_0.distcp' does not match" in result["message"], result["message"]
    assert wrong in result["message"] and sha256(iter_dir / "__2_0.distcp") in result["message"]
    assert not out.exists()


def test_the_result_has_the_hooks_schema(adapter_job_bin, mb_fixtures, tmp_path):
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    files = write_integrity(iter_dir)
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    report_file = tmp_path / "report.json"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--result", result_file, "--report",
                  report_file, "--verify-device", "cpu", np=2)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert set(result) == RESULT_KEYS, set(result)  # verified: no verification_skipped
    assert result["status"] == "exported" and result["exit_code"] == 0 and result["verified"] is True
    assert result["message"] == f"exported and verified {out}"
    assert result["checkpoint"] == {
        "path": str(ckpt), "iteration_dir": str(iter_dir), "iteration": "1",
        "integrity": f"verified ({len(files)} files)",
        "fingerprint": hashlib.sha256((iter_dir / "integrity.json").read_bytes()).hexdigest()}
    assert result["output"] == str(out)
    assert result["files"] == {name: sha256(out / name) for name in ADAPTER_FILES}
    assert set(result["seconds"]) == {"wait", "export", "total"}
    assert result["seconds"]["total"] >= result["seconds"]["export"] >= 0
    assert result["export"] == json.loads(report_file.read_text())
    assert result["export"]["ranks"] == 2 and result["export"]["verification"]["passed"] is True


def test_the_fingerprint_without_integrity_json_is_the_hooks(adapter_job_bin, mb_fixtures, tmp_path):
    """sha256 of `sha256(.metadata)\\n` and the sorted `name size` lines, as the hook's sha256sum pipeline made it,
    so that results written by the old hook are still recognised."""
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, "--result", result_file, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    lines = sorted(f"{p.name} {p.stat().st_size}\n" for p in iter_dir.iterdir() if p.is_file())
    text = sha256(iter_dir / ".metadata") + "\n" + "".join(lines)
    result = json.loads(result_file.read_text())
    assert result["checkpoint"]["fingerprint"] == hashlib.sha256(text.encode()).hexdigest()
    assert result["checkpoint"]["integrity"] == "absent"
    assert result["verified"] is False and result["verification_skipped"] == "--no-verify was given"
    assert result["message"] == f"exported {out}; verification skipped: --no-verify was given"


def test_the_same_result_skips_and_anything_else_is_refused(adapter_job_bin, mb_fixtures, tmp_path):
    ckpt = writable_copy(mb_fixtures / CKPT, tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    write_integrity(iter_dir)
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    args = ("--wait", "60", "--wait-poll", "0.2", "--wait-settle", "0.5", "--result", result_file, "--no-verify")
    first = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, *args)
    assert first.returncode == 0, first.stderr
    made = json.loads(result_file.read_text())
    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns

    again = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, *args, np=2)
    assert again.returncode == 0, again.stderr
    skipped = json.loads(result_file.read_text())
    assert skipped["status"] == "skipped" and skipped["exit_code"] == 0 and skipped["export"] is None
    assert skipped["message"] == f"the adapter in {out} already matches this checkpoint"
    assert skipped["files"] == made["files"] and skipped["checkpoint"] == made["checkpoint"]
    assert skipped["verified"] is False and skipped["verification_skipped"] == made["verification_skipped"]
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime, "the adapter was rewritten"

    # Another checkpoint (a new integrity.json): the adapter is not its export, and is not replaced without
    # --overwrite.
    (iter_dir / "integrity.json").write_text(json.dumps(json.loads((iter_dir / "integrity.json").read_text())))
    refused = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, *args)
    assert refused.returncode == 2, refused.stderr
    failed = json.loads(result_file.read_text())
    assert failed["status"] == "failed" and "exists and was not made from this checkpoint" in failed["message"]
    assert "pass --overwrite" in failed["message"]
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    # A failed result is no record of an adapter: the next run does not skip.
    redone = export(adapter_job_bin, mb_fixtures / "hf_base", ckpt, out, *args, "--overwrite")
    assert redone.returncode == 0, redone.stderr
    assert json.loads(result_file.read_text())["status"] == "exported"


def test_help_with_a_result_is_a_failure(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    config = tmp_path / "settings.ini"
    config.write_text("print-config = true\n")
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", mb_fixtures / CKPT, out, "--config", config,
                  "--result", result_file)
    assert proc.returncode == 2, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["status"] == "failed" and "exported nothing" in result["message"] and not out.exists()


def test_a_bad_option_is_recorded(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "adapter"
    result_file = tmp_path / "result.json"
    proc = export(adapter_job_bin, mb_fixtures / "hf_base", mb_fixtures / CKPT, out, "--wait", "soon",
                  "--result", result_file)
    assert proc.returncode == 2, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["exit_code"] == 2 and "--wait must be a number of seconds >= 0, not 'soon'" in result["message"]
    assert result["output"] == str(out) and not out.exists()


def test_the_hook_passes_its_settings_as_options(adapter_job_bin, mb_fixtures, tmp_path):
    """The hook is a wrapper: it writes no JSON itself and resolves no iteration (its text says so)."""
    hook = (Path(__file__).resolve().parents[2] / "jobs" / "export_hook.sh").read_text()
    code = "\n".join(line for line in hook.splitlines() if not line.lstrip().startswith("#"))
    for gone in ("python3", "latest_checkpointed_iteration.txt", "integrity.json", "sha256sum", "json.dump"):
        assert gone not in code, gone
    for option in ("--wait", "--wait-poll", "--wait-settle", "--result"):
        assert f"{option} " in code, option
    env = {**os.environ, "ADAPTER_JOB_CHECKPOINT": str(tmp_path / "none"), "ADAPTER_JOB_HF_MODEL": "x",
           "ADAPTER_JOB_OUTPUT": str(tmp_path / "adapter"), "ADAPTER_JOB_BIN": str(adapter_job_bin),
           "ADAPTER_JOB_WAIT_SECONDS": "0.5", "ADAPTER_JOB_POLL_SECONDS": "0.1"}
    proc = subprocess.run(["bash", str(Path(__file__).resolve().parents[2] / "jobs" / "export_hook.sh")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 4, proc.stderr
    result = json.loads((tmp_path / "adapter.result.json").read_text())
    assert "checkpoint not complete after 0.5 s" in result["message"], result["message"]
