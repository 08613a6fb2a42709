"""jobs/export_hook.sh, the post-training hook: waits for a complete checkpoint, exports (adapter_job checks
integrity.json) and verifies, writes a result JSON, and does nothing the second time. Checked against hashlib and the
files themselves."""
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_export_bad_input import writable_copy

HOOK = REPO / "jobs" / "export_hook.sh"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hook(adapter_job_bin, ckpt, hf, out, timeout=120, **env):
    settings = {"ADAPTER_JOB_CHECKPOINT": str(ckpt), "ADAPTER_JOB_HF_MODEL": str(hf), "ADAPTER_JOB_OUTPUT": str(out),
                "ADAPTER_JOB_BIN": str(adapter_job_bin), "ADAPTER_JOB_ARGS": "--verify-device cpu",
                "ADAPTER_JOB_POLL_SECONDS": "1", "ADAPTER_JOB_SETTLE_SECONDS": "1", **env}
    proc = subprocess.run(["bash", str(HOOK)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **settings})
    result = Path(settings.get("ADAPTER_JOB_RESULT", f"{out}.result.json"))
    return proc, (json.loads(result.read_text()) if result.exists() else None)


def write_integrity(iter_dir: Path) -> None:
    files = {p.name: sha256(p) for p in sorted(iter_dir.iterdir()) if p.is_file() and p.name != "integrity.json"}
    (iter_dir / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))


@pytest.fixture
def ckpt(mb_fixtures, tmp_path):
    return writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")


def test_exports_then_skips_the_same_checkpoint(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    iter_dir = next(ckpt.glob("iter_*"))
    write_integrity(iter_dir)
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "exported" and result["exit_code"] == 0
    assert result["checkpoint"]["iteration_dir"] == str(iter_dir)
    assert result["checkpoint"]["integrity"].startswith("verified")
    assert result["files"] == {n: sha256(out / n) for n in ("adapter_model.safetensors", "adapter_config.json")}
    assert result["export"]["verification"]["passed"] is True
    mb = mb_fixtures / "tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"
    assert (out / "adapter_model.safetensors").read_bytes() == mb.read_bytes()

    mtime = (out / "adapter_model.safetensors").stat().st_mtime_ns
    again, second = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert again.returncode == 0, again.stderr
    assert second["status"] == "skipped" and second["files"] == result["files"]
    assert second["checkpoint"]["fingerprint"] == result["checkpoint"]["fingerprint"]
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == mtime, "the adapter was rewritten"

    # A changed adapter is no longer "already made": without ADAPTER_JOB_OVERWRITE the hook refuses to touch it.
    (out / "adapter_config.json").write_text("{}")
    third, refused = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert third.returncode == 2 and refused["status"] == "failed"
    assert "ADAPTER_JOB_OVERWRITE=1" in refused["message"]
    assert (out / "adapter_config.json").read_text() == "{}"
    fourth, redone = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_OVERWRITE="1")
    assert fourth.returncode == 0 and redone["status"] == "exported", fourth.stderr
    assert redone["files"] == result["files"]


def test_integrity_mismatch_fails_at_once(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    iter_dir = next(ckpt.glob("iter_*"))
    write_integrity(iter_dir)
    shard = iter_dir / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = tmp_path / "adapter"
    start = time.monotonic()
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert time.monotonic() - start < 20
    assert proc.returncode == 2 and result["status"] == "failed" and result["exit_code"] == 2
    # adapter_job checks it (the hook passes its message on): the file and both digests.
    assert "__1_0.distcp' does not match" in result["message"], result["message"]
    assert hashlib.sha256(bytes(data)).hexdigest() in result["message"]
    assert json.loads((iter_dir / "integrity.json").read_text())["files"]["__1_0.distcp"] in result["message"]
    assert not out.exists()


def test_waits_for_a_checkpoint_being_written(adapter_job_bin, mb_fixtures, tmp_path):
    """The run directory appears piece by piece: the iteration first, latest_checkpointed_iteration.txt last."""
    src = mb_fixtures / "tp2pp2/lora/megatron_ckpt"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    out = tmp_path / "adapter"

    def write_slowly():
        time.sleep(2)
        iter_src = next(src.glob("iter_*"))
        dst = ckpt / iter_src.name
        dst.mkdir()
        for f in sorted(iter_src.iterdir(), key=lambda p: p.name == "metadata.json"):  # metadata.json last
            shutil.copy(f, dst / f.name)
            time.sleep(0.3)
        shutil.copy(src / "latest_checkpointed_iteration.txt", ckpt / "latest_checkpointed_iteration.txt")

    writer = threading.Thread(target=write_slowly)
    writer.start()
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_WAIT_SECONDS="60")
    writer.join()
    assert proc.returncode == 0, proc.stderr
    assert "waiting: no" in proc.stderr and "latest_checkpointed_iteration.txt yet" in proc.stderr
    assert result["status"] == "exported" and result["seconds"]["wait"] >= 2
    assert result["checkpoint"]["integrity"] == "absent"


def test_gives_up_on_an_unfinished_checkpoint(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    (next(ckpt.glob("iter_*")) / "metadata.json").unlink()  # Megatron writes it when the save is finalised
    out = tmp_path / "adapter"
    start = time.monotonic()
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_WAIT_SECONDS="3")
    assert time.monotonic() - start < 15
    assert proc.returncode == 4 and result["exit_code"] == 4
    assert "checkpoint not complete after 3 s: no" in result["message"] and "metadata.json yet" in result["message"]
    assert not out.exists()


def test_bad_settings_and_failed_verification(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", "", ADAPTER_JOB_RESULT=str(tmp_path / "r.json"))
    assert proc.returncode == 2 and "must be set" in result["message"]

    # A base model that does not fit the adapter's hidden size: bad input from the export, recorded as such.
    other = tmp_path / "hf_other"
    shutil.copytree(mb_fixtures / "hf_base", other)
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    proc, result = hook(adapter_job_bin, ckpt, other, tmp_path / "adapter")
    assert proc.returncode == 2 and result["exit_code"] == 2 and result["status"] == "failed"
    assert "error:" in proc.stderr and not (tmp_path / "adapter").exists()


def test_merge_then_skip_and_a_changed_shard_is_not_skipped(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    """ADAPTER_JOB_COMMAND=merge: the merged model, recorded by the sha256 of its small files and the size and mtime
    of its shards (re-hashing a 140 GB model on every run would take minutes); a shard changed in place is caught."""
    out = tmp_path / "merged"
    args = "--verify-device cpu --max-shard-size 100KB"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_COMMAND="merge",
                        ADAPTER_JOB_ARGS=args)
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "exported" and result["verified"] is True
    assert result["message"] == f"merged and verified {out}"
    assert result["export"]["verification"]["passed"] is True
    shards = sorted(out.glob("*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    assert result["files"] == {p.name: sha256(p) for p in out.iterdir() if p.suffix != ".safetensors"}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= result["files"].keys()
    assert result["weights"] == {p.name: {"bytes": p.stat().st_size, "modified_ns": p.stat().st_mtime_ns}
                                 for p in shards}
    original = {p.name: p.read_bytes() for p in shards}

    again, second = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_COMMAND="merge",
                         ADAPTER_JOB_ARGS=args)
    assert again.returncode == 0, again.stderr
    assert second["status"] == "skipped" and second["message"] == f"the merged model in {out} already matches this checkpoint"
    assert second["files"] == result["files"] and second["weights"] == result["weights"]
    assert second["verified"] is True

    # One byte of a shard changed, its size kept: its mtime tells, and the hook refuses to touch it.
    data = bytearray(original[shards[0].name])
    data[-1] ^= 0x01
    shards[0].write_bytes(bytes(data))
    third, refused = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_COMMAND="merge",
                          ADAPTER_JOB_ARGS=args)
    assert third.returncode == 2 and refused["status"] == "failed", third.stderr
    assert "ADAPTER_JOB_OVERWRITE=1" in refused["message"]
    assert shards[0].read_bytes() == bytes(data)
    fourth, redone = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_COMMAND="merge",
                          ADAPTER_JOB_ARGS=args, ADAPTER_JOB_OVERWRITE="1")
    assert fourth.returncode == 0 and redone["status"] == "exported", fourth.stderr
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))} == original


def test_an_unknown_command_is_refused_and_recorded(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    out = tmp_path / "merged"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_COMMAND="mrege")
    assert proc.returncode == 2 and result["status"] == "failed" and result["exit_code"] == 2
    assert result["message"] == "ADAPTER_JOB_COMMAND 'mrege' is not export or merge"
    assert not out.exists()
