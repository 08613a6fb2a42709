"""Faults of the machine rather than the input, under `mpirun -np 4`: a full disk, a shard that cannot be read.
Each ends with a non-zero exit, one message naming the cause, no partial output, nothing overwritten, and no hang.
(A rank killed mid-export: test_export_bad_input.py, and below through the hook. A checkpoint still being written
or failing its integrity.json: test_hook.py, where waiting for a complete checkpoint belongs.)"""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run
from test_export_bad_input import MPIRUN, export, snapshot, writable_copy
from test_hook import hook

INFRA = 4  # ExitCode::kInfrastructure


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "internal error" not in proc.stderr
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs: room for the fixture's bf16 adapter (73 KB), not for its fp32 upcast (138 KB)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk(adapter_job_bin, mb_fixtures, small_disk):
    out = small_disk / "out" / "adapter"
    out.parent.mkdir()
    start = time.monotonic()
    # fp32 makes the adapter 138 KB: more than the disk holds.
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                  "--dtype", "fp32", timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == INFRA, f"exit {proc.returncode}\n{proc.stderr}"
    error = one_error(proc)
    assert "No space left on device" in error and str(out.parent) in error, error
    assert snapshot(out) == {}, "partial output or staging left on the full disk"
    assert not any(small_disk.rglob("*.safetensors"))
    assert os.statvfs(small_disk).f_bfree * os.statvfs(small_disk).f_frsize > 100 << 10, "space not given back"


def test_full_disk_keeps_the_existing_adapter(adapter_job_bin, mb_fixtures, small_disk):
    out = small_disk / "out" / "adapter"
    ok = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out)
    assert ok.returncode == 0, ok.stderr
    before = snapshot(out)
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                  "--dtype", "fp32", "--overwrite", timeout=60)
    assert proc.returncode == INFRA, proc.stderr
    assert "No space left on device" in one_error(proc)
    assert snapshot(out) == before, "the existing adapter was touched"


def merge(binary, np, hf, ckpt, out, *extra, timeout=120):
    return run([*MPIRUN, "-np", str(np), binary, "merge", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt,
                "--output-hf-path", out, "--verify-device", "cpu", *extra], check=False, timeout=timeout)


@pytest.mark.parametrize("np", [1, 4])
def test_full_disk_merge(adapter_job_bin, mb_fixtures, small_disk, np):
    """The merged model (366 KB of shards) on the 128 KiB disk: every rank writes its own shards, one of them
    fills the disk; all end with 4, one message naming the file, and nothing is left on the disk."""
    out = small_disk / "out" / "merged"
    out.parent.mkdir()
    start = time.monotonic()
    proc = merge(adapter_job_bin, np, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                 "--max-shard-size", "60KB", timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == INFRA, f"exit {proc.returncode}\n{proc.stderr}"
    error = one_error(proc)
    assert "No space left on device" in error and str(out.parent) in error and ".safetensors" in error, error
    assert snapshot(out) == {}, "partial output or staging left on the full disk"
    assert os.statvfs(small_disk).f_bfree * os.statvfs(small_disk).f_frsize > 100 << 10, "space not given back"


def test_full_disk_merge_keeps_the_existing_model(adapter_job_bin, mb_fixtures, tmp_path):
    """Room for one merged model (with its scratch adapter), not for a second beside it: --overwrite stages the
    new one first, so the disk fills before the old one is touched."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "merged"
        ckpt = mb_fixtures / "tp2pp2/lora/megatron_ckpt"
        ok = merge(adapter_job_bin, 2, mb_fixtures / "hf_base", ckpt, out, "--max-shard-size", "60KB")
        assert ok.returncode == 0, ok.stderr
        before = snapshot(out)
        proc = merge(adapter_job_bin, 2, mb_fixtures / "hf_base", ckpt, out, "--max-shard-size", "60KB",
                     "--overwrite", "--dtype", "fp32", timeout=60)
        assert proc.returncode == INFRA, proc.stderr
        assert "No space left on device" in one_error(proc)
        assert snapshot(out) == before, "the existing merged model was touched"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("np", [4, 1])
def test_unreadable_shard(adapter_job_bin, mb_fixtures, tmp_path, np):
    """A shard that cannot be read (here: a directory where the file should be; as root, permissions would not
    stop a read) fails with the OS's reason and the file's name."""
    ckpt = writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")
    shard = next(ckpt.glob("iter_*")) / "__3_0.distcp"
    shard.unlink()
    shard.mkdir()
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    start = time.monotonic()
    proc = export(adapter_job_bin, np, mb_fixtures / "hf_base", ckpt, out, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    error = one_error(proc)
    assert "__3_0.distcp" in error and ("Is a directory" in error or "not a regular file" in error), error
    assert snapshot(out) == {}


@pytest.mark.parametrize("failure", ["2:MPI_Gather", "1:MPI_Allreduce", "0:MPI_Recv", "2:MPI_Send"])
def test_an_mpi_error_aborts_every_rank_with_4(adapter_job_bin, mb_fixtures, tmp_path, failure):
    """ADAPTER_JOB_TEST_MPI_ERROR=<rank>:<call>: that call fails on that rank, as when MPI notices a dead peer.
    The rank says which call failed and MPI_Abort ends every rank with 4. Before, an error outside the layer
    gather (MPI_Gather, MPI_Allreduce) left the other ranks waiting for that rank forever."""
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    start = time.monotonic()
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                  "--no-verify", env={"ADAPTER_JOB_TEST_MPI_ERROR": failure}, timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == INFRA, f"exit {proc.returncode}\n{proc.stderr}"
    rank, call = failure.split(":")
    error = one_error(proc)
    assert f"{call} failed: " in error and "another rank has died or cannot be reached" in error, error
    assert error.startswith(f"[rank {rank}] " if rank != "0" else "adapter_job export: error:"), error
    left = snapshot(out)
    if left:
        # MPI_Abort's SIGKILL follows its SIGTERM within milliseconds (strace: 5 ms), so rank 0, having gone on
        # (its MPI_Igather completed: the failing rank had sent its value), can die while staging its files,
        # before its SIGTERM cleanup has removed them. What is left must be only a staging directory of that dead
        # process, and the next run on this host removes it (README: --output-hf-path).
        assert all(re.fullmatch(r"\.adapter\.partial-[^/]+(/.*)?", name) for name in left), sorted(left)
        again = export(adapter_job_bin, 1, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                       "--no-verify", timeout=60)
        assert again.returncode == 0, again.stderr
        assert sorted(snapshot(out)) == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]


def test_a_killed_rank_is_exit_4_from_the_hook(adapter_job_bin, mb_fixtures, tmp_path):
    """mpirun itself exits 137 for a rank killed by SIGKILL (test_export_bad_input.py); the hook reports 4 and says
    what happened."""
    ckpt = writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")
    out = tmp_path / "adapter"
    proc, result = hook(adapter_job_bin, ckpt, mb_fixtures / "hf_base", out, timeout=60,
                        ADAPTER_JOB_LAUNCHER=" ".join([*MPIRUN, "-np", "4"]),
                        ADAPTER_JOB_TEST_KILL_RANK="2:2")
    assert proc.returncode == INFRA, proc.stderr
    assert result["exit_code"] == INFRA and result["status"] == "failed"
    assert "(exit 137): a rank was killed by signal 9" in result["message"], result["message"]
    assert not out.exists()
