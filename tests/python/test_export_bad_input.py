"""`adapter_job export` on bad input, under MPI: exit 2 with one clear message naming the file and/or key, no output
directory and no hidden staging leftovers beside it, and an existing output never touched. A rank killed mid-run
fails the job quickly and leaves nothing behind either."""
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
from torch.distributed.checkpoint.metadata import MetadataIndex

from conftest import run

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
FC2_IN = "decoder.layers.mlp.linear_fc2.adapter.linear_in.weight"
QKV_OUT = "decoder.layers.self_attention.linear_qkv.adapter.linear_out.weight"
FC1_IN = "decoder.layers.mlp.linear_fc1.adapter.linear_in.weight"
FC1_OUT = "decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst


@pytest.fixture
def ckpt(mb_fixtures, tmp_path):
    """A writable copy of Megatron-Bridge's TP2xPP2 checkpoint (run dir)."""
    return writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")


@pytest.fixture
def outdir(tmp_path):
    """The output path, alone in its own parent, so any leftover beside it shows."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    return parent / "adapter"


def snapshot(path: Path) -> dict:
    """Every file under `path` (and the parent's entries) with its bytes."""
    files = {str(p.relative_to(path.parent)): p.read_bytes() if p.is_file() else None for p in path.parent.rglob("*")}
    return files


def export(binary, np, hf, ckpt, out, *extra, env=None, timeout=120):
    return run([*MPIRUN, "-np", str(np), binary, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt,
                "--output-hf-path", out, *extra], check=False, timeout=timeout, env={**os.environ, **(env or {})})


def expect_bad_input(proc, out: Path, *fragments, before: dict | None = None) -> str:
    """Exit 2, one error line naming every fragment, and the output's parent exactly as before (empty if None)."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "internal error" not in proc.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0], f"missing {fragment!r} in: {errors[0]}"
    assert snapshot(out) == (before or {}), "the output's parent changed (output or staging leftovers)"
    assert not out.exists() or before
    return errors[0]


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("np", [4, 1])
def test_missing_shard_file(adapter_job_bin, mb_fixtures, ckpt, outdir, np):
    (ckpt / "iter_0000001/__3_0.distcp").unlink()
    proc = export(adapter_job_bin, np, mb_fixtures / "hf_base", ckpt, outdir)
    expect_bad_input(proc, outdir, "__3_0.distcp")


def test_failed_export_creates_no_parent_dirs(adapter_job_bin, mb_fixtures, ckpt, tmp_path):
    """An output path under missing directories: a failed export must not leave those directories behind."""
    (ckpt / "iter_0000001/__3_0.distcp").unlink()
    top = tmp_path / "outputs"
    top.mkdir()
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", ckpt, top / "new" / "sub" / "adapter")
    assert proc.returncode == 2, proc.stderr
    assert list(top.iterdir()) == [], f"left behind: {sorted(map(str, top.rglob('*')))}"


def test_failed_export_leaves_existing_output_alone(adapter_job_bin, mb_fixtures, ckpt, outdir):
    """Even with --overwrite, an export that fails must not remove or touch the old output."""
    outdir.mkdir()
    (outdir / "adapter_config.json").write_text("old config")
    (outdir / "README.md").write_text("keep me")  # an earlier adapter's model card
    before = snapshot(outdir)
    (ckpt / "iter_0000001/__1_0.distcp").unlink()
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", ckpt, outdir, "--overwrite")
    expect_bad_input(proc, outdir, "__1_0.distcp", before=before)


@pytest.mark.parametrize("field,value,fragments", [
    ("hidden_size", 128, [FC1_IN]),
    ("intermediate_size", 256, [FC1_OUT]),
    ("num_key_value_heads", 4, [QKV_OUT]),
    ("num_hidden_layers", 6, []),
])
@pytest.mark.parametrize("np", [2, 4])
def test_shapes_contradict_hf_config(adapter_job_bin, mb_fixtures, tmp_path, outdir, field, value, fragments, np):
    hf = writable_copy(mb_fixtures / "hf_base", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config[field] != value
    config[field] = value
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    proc = export(adapter_job_bin, np, hf, mb_fixtures / "tp2pp2/lora/megatron_ckpt", outdir)
    expect_bad_input(proc, outdir, hf / "config.json", *fragments)


@pytest.mark.parametrize("np", [1, 4])
def test_unknown_target_module(adapter_job_bin, mb_fixtures, ckpt, outdir, np):
    meta_path = ckpt / "iter_0000001/.metadata"
    meta = pickle.loads(meta_path.read_bytes())
    renamed = FC2_IN.replace("linear_fc2", "linear_fc9")
    assert FC2_IN in meta.state_dict_metadata
    meta.state_dict_metadata = {renamed if k == FC2_IN else k: v for k, v in meta.state_dict_metadata.items()}
    storage = {}
    for index, info in meta.storage_data.items():
        storage[MetadataIndex(renamed, index.offset, index.index) if index.fqn == FC2_IN else index] = info
    assert sum(i.fqn == renamed for i in storage) == 8  # 4 layers x 2 TP shards
    meta.storage_data = storage
    meta_path.write_bytes(pickle.dumps(meta))
    proc = export(adapter_job_bin, np, mb_fixtures / "hf_base", ckpt, outdir)
    expect_bad_input(proc, outdir, renamed, "no HuggingFace mapping in the llama family", "mlp.linear_fc2")


def test_existing_output_needs_overwrite(adapter_job_bin, mb_fixtures, outdir):
    outdir.mkdir()
    (outdir / "adapter_model.safetensors").write_bytes(b"not an adapter")
    (outdir / "README.md").write_text("keep me")  # an earlier adapter's (what --overwrite may replace)
    before = snapshot(outdir)
    ckpt = mb_fixtures / "tp2pp2/lora/megatron_ckpt"
    for np in (4, 1):
        proc = export(adapter_job_bin, np, mb_fixtures / "hf_base", ckpt, outdir)
        expect_bad_input(proc, outdir, outdir.name, before=before)

    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", ckpt, outdir, "--overwrite", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    mb = mb_fixtures / "tp2pp2/lora/mb_export_adapter"
    assert sorted(p.name for p in outdir.parent.iterdir()) == ["adapter"]  # no staging or backup left beside it
    assert sorted(p.name for p in outdir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (outdir / "adapter_model.safetensors").read_bytes() == (mb / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("kill", ["2:2", "3:3", "0:3"])
def test_killed_rank_fails_fast_and_leaves_nothing(adapter_job_bin, mb_fixtures, outdir, kill):
    """ADAPTER_JOB_TEST_KILL_RANK=<rank>:<layer>: that rank SIGKILLs itself on reaching the layer (rank 0 writes)."""
    start = time.monotonic()
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", outdir,
                  env={"ADAPTER_JOB_TEST_KILL_RANK": kill}, timeout=60)
    elapsed = time.monotonic() - start
    # Open MPI ends the other ranks itself and passes on the first dead rank's status, 128 + SIGKILL, whatever
    # the survivors would exit with (README, exit codes); jobs/export_hook.sh turns it into 4.
    assert proc.returncode == 137, f"exit {proc.returncode}: the injected kill did not happen?\n{proc.stderr}"
    assert "signal 9" in proc.stderr or "Killed" in proc.stderr, proc.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s to fail"
    assert snapshot(outdir) == {}, "output or staging leftovers"

    # The same run without the fault succeeds, so the failure above is the injected one.
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", mb_fixtures / "tp2pp2/lora/megatron_ckpt", outdir)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in outdir.parent.iterdir()) == ["adapter"]


def test_forced_nccl_without_gpus_names_the_rank(adapter_job_bin, mb_fixtures, ckpt, outdir):
    # CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on GPU machines too.
    proc = export(adapter_job_bin, 2, mb_fixtures / "hf_base", ckpt, outdir, "--backend", "nccl",
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 4, f"exit {proc.returncode}\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "--backend nccl needs a GPU of its own for every rank: rank 0 on " in errors[0], errors[0]
    assert "sees no GPU" in errors[0]
    assert snapshot(outdir) == {}
