"""What jobs/export_hook.sh's result can be trusted for: "exported" only when something was exported, "verified"
only when the export's report says so, a checkpoint taken only once its files stopped changing for the settle time,
a result that is valid JSON whatever the paths hold, and ADAPTER_JOB_ARGS passed on word for word."""
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from test_export_bad_input import writable_copy
from test_hook import hook, sha256

MB_ADAPTER = "tp2pp2/lora/mb_export_adapter/adapter_model.safetensors"


@pytest.fixture
def ckpt(mb_fixtures, tmp_path):
    return writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")


@pytest.mark.parametrize("option", ["--help", "-h", "--print-config", "--print", "--he", "--output-hf-path=/tmp/x",
                                    "--report=/tmp/r.json", "--overwrite"])
def test_options_that_would_not_export_are_refused(adapter_job_bin, mb_fixtures, ckpt, tmp_path, option):
    """Before: `--help` and `--print-config` printed, exited 0, and the hook wrote "exported"."""
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out,
                        ADAPTER_JOB_ARGS=f"--verify-device cpu {option}")
    assert proc.returncode == 2, proc.stderr
    assert result["status"] == "failed" and result["exit_code"] == 2 and result["verified"] is False
    assert f"ADAPTER_JOB_ARGS: '{option}'" in result["message"], result["message"]
    assert not out.exists()


def test_a_config_file_asking_for_print_config_is_not_an_export(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    config = tmp_path / "settings.ini"
    config.write_text("print-config = true\n")
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out,
                        ADAPTER_JOB_ARGS=f"--verify-device cpu --config {config}")
    assert proc.returncode == 2, proc.stderr
    assert result["status"] == "failed" and "exported nothing" in result["message"], result["message"]
    assert not out.exists()


def test_no_verify_is_not_reported_as_verified(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    """Before: "exported and verified" with --no-verify too."""
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_ARGS="--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "exported" and result["verified"] is False
    assert "--no-verify" in result["verification_skipped"]
    assert "verified" not in result["message"], result["message"]
    assert "verification" not in result["export"]
    # The second run finds the same adapter and still does not claim it was verified.
    again, second = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_ARGS="--no-verify")
    assert again.returncode == 0 and second["status"] == "skipped", again.stderr
    assert second["verified"] is False and second["verification_skipped"] == result["verification_skipped"]


def test_a_verified_export_says_so(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert proc.returncode == 0, proc.stderr
    assert result["verified"] is True and "verification_skipped" not in result
    assert result["export"]["verification"]["passed"] is True
    assert result["message"] == f"exported and verified {out}"
    again, second = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert second["status"] == "skipped" and second["verified"] is True, again.stderr


def test_waits_until_a_slow_writer_has_finished(adapter_job_bin, mb_fixtures, tmp_path):
    """Megatron's markers are there, but a shard is still written in pieces, with pauses longer than a second.
    Before: one look a second later found nothing changed and the hook exported the half-written shard."""
    src = mb_fixtures / "tp2pp2/lora/megatron_ckpt"
    ckpt = writable_copy(src, tmp_path / "ckpt")
    iter_dir = next(ckpt.glob("iter_*"))
    shard = iter_dir / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(b"")
    finished = []

    def write_slowly():
        pieces = 4
        step = len(data) // pieces + 1
        with shard.open("wb") as f:
            for i in range(pieces):
                time.sleep(1.5)
                f.write(data[i * step:(i + 1) * step])
                f.flush()
        finished.append(time.monotonic())

    out = tmp_path / "adapter"
    writer = threading.Thread(target=write_slowly)
    start = time.monotonic()
    writer.start()
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, ADAPTER_JOB_SETTLE_SECONDS="3",
                        ADAPTER_JOB_WAIT_SECONDS="60")
    writer.join()
    assert proc.returncode == 0, proc.stderr
    assert result["seconds"]["wait"] >= finished[0] - start, (result["seconds"], finished[0] - start)
    assert result["seconds"]["wait"] >= 3
    assert shard.read_bytes() == data
    assert (out / "adapter_model.safetensors").read_bytes() == (mb_fixtures / MB_ADAPTER).read_bytes()


def test_control_characters_in_paths_give_valid_json(adapter_job_bin, mb_fixtures, tmp_path):
    """Before: the hook escaped only \\n, \\t, \\r, \\\\ and \", so a \\x01 or an ESC made the result invalid JSON."""
    odd = "run\x01\x1b[31m\x7f \"q\" \\"
    ckpt = writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / odd / "ckpt")
    out = tmp_path / odd / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert proc.returncode == 0, proc.stderr
    assert result is not None and result["status"] == "exported"
    assert result["output"] == str(out) and result["checkpoint"]["path"] == str(ckpt)
    assert result["files"]["adapter_model.safetensors"] == sha256(out / "adapter_model.safetensors")


def test_args_are_not_glob_expanded(adapter_job_bin, mb_fixtures, ckpt, tmp_path, monkeypatch):
    """Before: `--prompt *` became one prompt per file of the working directory."""
    here = tmp_path / "cwd"
    here.mkdir()
    for name in ("Paris", "Rome"):
        (here / name).write_text("")
    monkeypatch.chdir(here)
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out,
                        ADAPTER_JOB_ARGS="--verify-device cpu --prompt *")
    assert proc.returncode == 0, proc.stderr
    prompts = [p["prompt"] for p in result["export"]["verification"]["prompts"]]
    assert prompts == ["*"], prompts


def test_a_disguised_md5_manifest_is_not_verified(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    """An md5 manifest with a sha256-looking decoy inside. Before: the hook's grep found `"algorithm": "sha256"` and
    one 64-hex digest, skipped the md5 ones, and recorded "verified (1 files)"."""
    import hashlib
    iter_dir = next(ckpt.glob("iter_*"))
    files = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(iter_dir.iterdir()) if p.is_file()}
    manifest = {"algorithm": "md5", "files": files,
                "note": {"algorithm": "sha256", "metadata.json": sha256(iter_dir / "metadata.json")}}
    (iter_dir / "integrity.json").write_text(json.dumps(manifest, indent=2))
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert proc.returncode == 2, proc.stderr
    assert result["status"] == "failed" and result["exit_code"] == 2
    assert "integrity.json: algorithm is 'md5'" in result["message"], result["message"]
    assert not out.exists()


def test_integrity_is_the_binarys_report(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    """The result's integrity comes from the export's report: what adapter_job checked, not what a grep saw."""
    iter_dir = next(ckpt.glob("iter_*"))
    files = {p.name: sha256(p) for p in sorted(iter_dir.iterdir()) if p.is_file()}
    (iter_dir / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}))
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out)
    assert proc.returncode == 0, proc.stderr
    assert result["export"]["integrity"] == {"checked": True, "files": len(files)}
    assert result["checkpoint"]["integrity"] == f"verified ({len(files)} files)"

    shutil.rmtree(out)
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out,
                        ADAPTER_JOB_ARGS="--verify-device cpu --no-integrity-check")
    assert proc.returncode == 0, proc.stderr
    assert result["checkpoint"]["integrity"] == "not checked: --no-integrity-check"
