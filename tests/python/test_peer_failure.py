"""A peer that dies or cannot be reached mid-gather ends every rank with exit 4 and a message naming the rank and
host that saw it, never a hang.

Under a plain `mpirun` Open MPI kills the other ranks itself when one dies (exit 137: test_export_bad_input.py).
Here the launcher is told to leave the survivors running (`--enable-recovery`, as srun without --kill-on-bad-exit
does), so it is the survivors themselves that must notice: every wait watches the peers' processes, and the first
to see the dead one aborts the job with 4 (MPI_Abort). Each rank runs under a shell that records its own exit
status; the abort races those shells (Open MPI ends them too), so a survivor may record 4, be recorded ended by the
abort's SIGTERM, or record nothing, and the test then checks that no process of the run is left. The time bound is
the subprocess timeout only (a hang fails the test); ASan runs these too. Before this, the survivors waited forever.

The same under `--backend nccl` on two GPUs: test_gpu_peer_failure.py.
"""
import os
import re
import socket
from pathlib import Path

import pytest

from conftest import run
from test_export_bad_input import MPIRUN, export, snapshot

INFRA = 4  # ExitCode::kInfrastructure
KILLED = 128 + 9  # the shell's status for a child killed by SIGKILL
# Open MPI's processor name is the host name; the message names it.
HOST = socket.gethostname()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def export_with_dead_rank(binary, np, hf, ckpt, out, status_dir: Path, kill: str, *extra, mpirun_args=(),
                          timeout=120, command="export"):
    """`mpirun --enable-recovery -np N`, each rank under `sh` writing its exit status to status_dir/<rank>; rank:layer
    in `kill` SIGKILLs itself on reaching that layer (ADAPTER_JOB_TEST_KILL_RANK)."""
    status_dir.mkdir()
    record = '"$@"; echo $? > "$ADAPTER_JOB_STATUS_DIR/$OMPI_COMM_WORLD_RANK"'
    cmd = [*MPIRUN, *mpirun_args, "--enable-recovery", "-x", "ADAPTER_JOB_STATUS_DIR", "-x",
           "ADAPTER_JOB_TEST_KILL_RANK", "-np", str(np), "sh", "-c", record, "sh", binary, command,
           "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt, "--output-hf-path", out, "--no-verify", *extra]
    env = {**os.environ, "ADAPTER_JOB_STATUS_DIR": str(status_dir), "ADAPTER_JOB_TEST_KILL_RANK": kill}
    proc = run(cmd, check=False, timeout=timeout, env=env)
    statuses = {int(p.name): int(p.read_text()) for p in status_dir.iterdir()}
    return proc, statuses


def processes_of(out: Path) -> list[int]:
    """Pids of the processes still running whose command line names `out` (this run's ranks)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(out).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass  # ended meanwhile
    return pids


def check_dead_peer_ends_every_rank(proc, statuses, np, killed, out):
    """Every rank has ended: the killed one by SIGKILL, each other one by itself with 4 or by the MPI_Abort of the
    first that noticed (SIGTERM; or its recording shell was ended first, and it recorded nothing); at least one said
    which rank on which host died, naming its own rank and host too."""
    report = f"exit {proc.returncode}, statuses {statuses}\n{proc.stderr}"
    left = processes_of(out)
    for pid in left:  # this test's own ranks: end them before failing
        os.kill(pid, 9)
    assert not left, f"ranks still running after mpirun returned: {left}\n{report}"
    assert statuses.get(killed) == KILLED, f"the injected kill did not happen?\n{report}"
    assert set(statuses) <= set(range(np)), report
    for rank, status in statuses.items():
        assert rank == killed or status in (INFRA, 128 + 15), f"rank {rank} ended with {status}\n{report}"
    # "rank R on H: <call> failed: rank K on H [and rank J on H] has/have died, ...": every rank that ended before
    # the speaker looked is named (the abort of another survivor can be among them), the killed one by someone.
    errors = error_lines(proc.stderr)
    said = re.compile(rf"rank (\d+) on {re.escape(HOST)}: \w+ failed: (.*) ha(?:s|ve) died, so every rank is aborted")
    speakers = {}
    for match in filter(None, map(said.search, errors)):
        named = re.findall(rf"rank (\d+) on {re.escape(HOST)}", match.group(2))
        speakers[int(match.group(1))] = {int(rank) for rank in named}
    assert any(killed in dead for dead in speakers.values()), f"no rank said that rank {killed} died\n{report}"
    assert killed not in speakers and len(speakers) == len(errors), f"other errors than a dead peer\n{report}"
    for rank in speakers:
        assert statuses.get(rank, INFRA) == INFRA, f"rank {rank} spoke but ended with {statuses[rank]}\n{report}"
    assert "internal error" not in proc.stderr, report
    assert snapshot(out) == {}, "output or staging leftovers"


@pytest.mark.parametrize("np,kill", [(2, "1:2"), (4, "2:2"), (4, "3:3"), (3, "0:1")],
                         ids=["np2-leader-of-stage-1", "np4-leader-mid-allgather", "np4-member-mid-allgather",
                              "np3-rank-0"])
def test_a_rank_killed_mid_gather_ends_every_rank_with_4(adapter_job_bin, mb_fixtures, tmp_path, np, kill):
    """TP2 x PP2: with 4 ranks, ranks 2 and 3 all-gather stage 1 (layers 2, 3) and rank 2 sends it to rank 0; with 2,
    rank 1 holds stage 1 alone; with 3, rank 0 dies while the others still send."""
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    proc, statuses = export_with_dead_rank(adapter_job_bin, np, mb_fixtures / "hf_base",
                                           mb_fixtures / "tp2pp2/lora/megatron_ckpt", out, tmp_path / "status", kill)
    check_dead_peer_ends_every_rank(proc, statuses, np, int(kill.split(":")[0]), out)


def test_a_rank_killed_mid_merge_ends_every_rank_with_4(adapter_job_bin, mb_fixtures, tmp_path):
    """`adapter_job merge`: rank 1 dies after writing its first block of the merged model (<rank>:merge); rank 0,
    done with its own share, notices while they agree on the outcome, and removes both staging directories (the
    merged model's and the adapter's it merged from)."""
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    proc, statuses = export_with_dead_rank(adapter_job_bin, 2, mb_fixtures / "hf_base",
                                           mb_fixtures / "tp2pp2/lora/megatron_ckpt", out, tmp_path / "status",
                                           "1:merge", "--max-shard-size", "100KB", command="merge")
    check_dead_peer_ends_every_rank(proc, statuses, 2, 1, out)
    assert list(out.parent.iterdir()) == [], "staging left behind"


# <rank>:<call>:<n>: the n-th such call on that rank. Each rank's first MPI_Allgather picks the transport (the
# host's GPUs); the next ones are its stage's layers: rank 1's layer 1, rank 3's layer 2.
@pytest.mark.parametrize("failure", ["1:MPI_Allgather:3", "3:MPI_Allgather:2", "2:MPI_Send:2", "0:MPI_Recv:1"])
def test_an_mpi_error_mid_gather_names_the_rank_and_host(adapter_job_bin, mb_fixtures, tmp_path, failure):
    """ADAPTER_JOB_TEST_MPI_ERROR (test_faults.py) on the gather's own calls: exit 4, and the one message names the
    rank and the host where the call failed."""
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", out,
                  "--no-verify", env={"ADAPTER_JOB_TEST_MPI_ERROR": failure}, timeout=120)
    assert proc.returncode == INFRA, f"exit {proc.returncode}\n{proc.stderr}"
    rank, call, _ = failure.split(":")
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert f"rank {rank} on {HOST}: {call} failed: " in errors[0], errors[0]
    assert snapshot(out) == {}


def test_the_same_export_without_a_fault_succeeds(adapter_job_bin, mb_fixtures, tmp_path):
    """The runs above differ from this one by the injected fault alone, under the same launcher."""
    out = tmp_path / "outputs" / "adapter"
    out.parent.mkdir()
    proc, statuses = export_with_dead_rank(adapter_job_bin, 4, mb_fixtures / "hf_base",
                                           mb_fixtures / "tp2pp2/lora/megatron_ckpt", out, tmp_path / "status", "")
    assert statuses == {0: 0, 1: 0, 2: 0, 3: 0}, proc.stderr
    assert (out / "adapter_model.safetensors").is_file()
