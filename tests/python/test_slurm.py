"""slurm/export.sbatch on a real single-node Slurm: munged, slurmctld and slurmd are started here on localhost (own
ports, own munge socket, state in a temporary directory), `sbatch --wait` runs the script with 4 tasks on the demo
checkpoint, and everything is stopped afterwards. The node advertises 4 GPUs as a count-only resource so that the
script's own #SBATCH defaults (one task per GPU) are what gets scheduled.

Without slurm-wlm and munge installed (scripts/install.sh installs them) the module skips itself, and ctest
reports the test as skipped."""
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from tiny_llama import TinyLlamaConfig, build_tiny_llama

DAEMONS = ("munged", "slurmctld", "slurmd")
if not all(shutil.which(d) or Path("/usr/sbin", d).exists() for d in DAEMONS) or not shutil.which("sbatch"):
    pytest.skip("Slurm tests not run: slurm-wlm and munge are not installed", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("Slurm tests not run: slurmd must run as root", allow_module_level=True)

SCRIPT = REPO / "slurm" / "export.sbatch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "munge"):
        (root / d).mkdir()
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=adapterjobci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'slurmctld.log'}
SlurmdLogFile={root / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 Gres=gpu:4 State=UNKNOWN
PartitionName=ci Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
    # Four stand-in device files: slurmd counts a GPU per file.
    for i in range(4):
        (root / f"gpu{i}").touch()
    (root / "gres.conf").write_text(f"Name=gpu File={root}/gpu[0-3]\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = [subprocess.Popen([daemon("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
                               f"--log-file={root / 'munge' / 'munged.log'}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.1)
        procs.append(subprocess.Popen([daemon("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([daemon("slurmd"), "-D", "-f", str(conf)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        state = ""
        for _ in range(100):
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.2)
        if state != "idle":
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in root.rglob("*.log"))
            pytest.fail(f"the test Slurm did not come up (node state {state!r})\n{logs}")
        yield env
    finally:
        subprocess.run(["scancel", "--quiet", "--full", "-u", "root"], env=env, capture_output=True)
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = build_tiny_llama(TinyLlamaConfig(), root / "hf_base")
    ckpt = write_checkpoint(CheckpointConfig(out=root / "megatron_ckpt", tp=2, pp=2, base_model=base))
    return base, ckpt.root


def sbatch(env, workdir: Path, *args, extra_env=None):
    env = {**env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(extra_env or {})}
    # The node has 4 CPUs for 4 tasks: one each, instead of the script's 4.
    return subprocess.run(["sbatch", "--wait", "--parsable", f"--chdir={workdir}", "--cpus-per-task=1",
                           str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True, timeout=180)


def job_log(workdir: Path, proc) -> str:
    job_id = proc.stdout.strip().split(";")[0]
    return (workdir / f"adapter_job-{job_id}.log").read_text()


@pytest.mark.parametrize("launch", ["", "mpirun"])
def test_sbatch_exports_with_four_tasks(cluster, demo, adapter_job_bin, tmp_path, launch):
    """launch "": the script's choice (srun --mpi=pmix where Slurm has PMIx); "mpirun": inside the allocation."""
    base, ckpt = demo
    proc = sbatch(cluster, tmp_path, "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
                  "--output-hf-path", tmp_path / "adapter", "--verify-device", "cpu", "--report", tmp_path / "r.json",
                  extra_env={"ADAPTER_JOB_BIN": str(adapter_job_bin), "ADAPTER_JOB_LAUNCH": launch})
    log = job_log(tmp_path, proc)
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    assert "4 tasks" in log and "exit code 0" in log and "verification PASSED" in log, log
    if launch == "mpirun":
        assert "launching with mpirun" in log, log
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ranks"] == 4 and report["verification"]["passed"]
    # The same adapter as one process makes without Slurm.
    run([adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
         "--output-hf-path", tmp_path / "plain", "--no-verify"])
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_sbatch_merges_with_four_tasks(cluster, demo, adapter_job_bin, tmp_path):
    base, ckpt = demo
    proc = sbatch(cluster, tmp_path, "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
                  "--output-hf-path", tmp_path / "merged", "--verify-device", "cpu", "--max-shard-size", "100KB",
                  extra_env={"ADAPTER_JOB_BIN": str(adapter_job_bin), "ADAPTER_JOB_COMMAND": "merge"})
    log = job_log(tmp_path, proc)
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    assert "adapter_job merge: job" in log and "verification PASSED" in log, log
    # The same files as one process writes without Slurm.
    run([adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
         "--output-hf-path", tmp_path / "plain", "--no-verify", "--max-shard-size", "100KB"])
    names = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert len([n for n in names if n.startswith("model-")]) > 1
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == names
    for name in names:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name


def test_sbatch_refuses_an_unknown_command(cluster, demo, adapter_job_bin, tmp_path):
    proc = sbatch(cluster, tmp_path, extra_env={"ADAPTER_JOB_BIN": str(adapter_job_bin),
                                                "ADAPTER_JOB_COMMAND": "mrege"})
    log = job_log(tmp_path, proc)
    assert proc.returncode == 2 and "'mrege' is not export or merge" in log, log


def test_sbatch_passes_the_exit_code_through(cluster, demo, adapter_job_bin, tmp_path):
    base, ckpt = demo
    # Inputs from the environment, as the hook names them; the checkpoint does not exist: bad input, exit 2.
    proc = sbatch(cluster, tmp_path, extra_env={
        "ADAPTER_JOB_BIN": str(adapter_job_bin), "ADAPTER_JOB_HF_MODEL": str(base),
        "ADAPTER_JOB_CHECKPOINT": str(tmp_path / "no_such_ckpt"), "ADAPTER_JOB_OUTPUT": str(tmp_path / "adapter")})
    log = job_log(tmp_path, proc)
    assert proc.returncode == 2, f"{proc.returncode}\n{proc.stderr}\n{log}"
    assert "no_such_ckpt" in log and "exit code 2" in log, log
    assert not (tmp_path / "adapter").exists()
