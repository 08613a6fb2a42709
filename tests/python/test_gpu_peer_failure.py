"""A rank killed mid-gather under `--backend nccl` ends every rank with exit 4, as under MPI
(test_peer_failure.py): the survivors' waits poll NCCL's asynchronous error and the peers' processes, abort the
communicator (ncclCommAbort; ncclCommDestroy would wait for the dead peer's data), and end the job.

Needs two CUDA GPUs. With fewer the whole module skips; ctest then lists it as skipped (SKIP_REGULAR_EXPRESSION),
never as passed. `ctest -L gpu` runs it with test_gpu.py.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

from test_peer_failure import HOST, check_dead_peer_ends_every_rank, export_with_dead_rank


def _gpus() -> int:
    """What the binary under test sees ("GPUs: N" from `adapter_job version`), without importing torch."""
    build = Path(os.environ.get("ADAPTER_JOB_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))
    binary = os.environ.get("ADAPTER_JOB_BIN", build / "src" / "cli" / "adapter_job")
    try:
        out = subprocess.run([str(binary), "version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    found = re.search(r"^GPUs: (\d+)", out, re.MULTILINE)
    return int(found.group(1)) if found else 0


# NVLink multicast stays off on the lent GPU machines (as in test_gpu.py).
NCCL_MPIRUN_ARGS = ("-x", "NCCL_NVLS_ENABLE=0")
GPUS = _gpus()
if GPUS < 2:
    pytest.skip(f"GPU tests not run: the NCCL peer-failure test needs 2 CUDA GPUs, this machine has {GPUS}",
                allow_module_level=True)


@pytest.mark.parametrize("np,kill", [(2, "1:2"), (4, "2:2"), (4, "3:3")],
                         ids=["np2-leader-of-stage-1", "np4-leader-mid-allgather", "np4-member-mid-allgather"])
def test_a_rank_killed_mid_gather_under_nccl_ends_every_rank_with_4(adapter_job_bin, mb_fixtures, tmp_path, np,
                                                                      kill):
    if np > GPUS:
        pytest.skip(f"needs {np} GPUs, this machine has {GPUS}")
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    proc, statuses = export_with_dead_rank(adapter_job_bin, np, mb_fixtures / "hf_base",
                                           mb_fixtures / "tp2pp2/lora/megatron_ckpt", out, tmp_path / "status", kill,
                                           "--backend", "nccl", mpirun_args=NCCL_MPIRUN_ARGS, timeout=180)
    check_dead_peer_ends_every_rank(proc, statuses, np, int(kill.split(":")[0]), out)
    # The survivor saw it in an NCCL wait, or before (the MPI collectives around the gather): either names the host.
    assert f"on {HOST}" in proc.stderr


def test_the_same_nccl_export_without_a_fault_succeeds(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    proc, statuses = export_with_dead_rank(adapter_job_bin, 2, mb_fixtures / "hf_base",
                                           mb_fixtures / "tp2pp2/lora/megatron_ckpt", out, tmp_path / "status", "",
                                           "--backend", "nccl", mpirun_args=NCCL_MPIRUN_ARGS, timeout=180)
    assert statuses == {0: 0, 1: 0}, proc.stderr
    assert (out / "adapter_model.safetensors").is_file()
