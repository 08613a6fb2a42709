"""The base model as people name it (issue 16, part 2): `--hf-model-id org/name` resolved offline through the local
HF cache, as huggingface_hub resolves it.

The cache here is laid out as huggingface_hub writes it (models--org--name/blobs, snapshots/<commit>/ of symlinks,
refs/<branch or tag>), and huggingface_hub's own offline lookups (snapshot_download(local_files_only=True),
try_to_load_from_cache) must resolve it to the directory our export reports, for $HF_HUB_CACHE and for $HF_HOME/hub.
The export then reads and verifies that snapshot, records `org/name` (not the snapshot path) as
base_model_name_or_path, and writes the same tensors as from the plain directory; `--revision` picks a tag or a
commit; a revision the cache lacks, and a model it lacks under verification, are errors naming what was looked for.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from test_families import MPIRUN, export
from tiny_llama import TinyLlamaConfig, build_tiny_llama

REPO = "acme/tiny-llama"
MAIN, TAGGED = "a" * 40, "b" * 40


def cache_snapshot(cache: Path, model_dir: Path, commit: str, refs: tuple[str, ...]) -> Path:
    """Adds `model_dir`'s files to the cache as commit `commit`, the refs pointing at it, as huggingface_hub's
    download does: each file a blob named by its digest, the snapshot's entries relative symlinks to the blobs."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_cache")
    base = build_tiny_llama(TinyLlamaConfig(), root / "base")
    other = build_tiny_llama(TinyLlamaConfig(seed=1), root / "other")
    cache = root / "home" / "hub"
    snapshots = {MAIN: cache_snapshot(cache, base, MAIN, ("main",)),
                 TAGGED: cache_snapshot(cache, other, TAGGED, ("v1",))}
    written = write_checkpoint(CheckpointConfig(out=root / "ckpt", base_model=base))
    return root, base, cache, snapshots, written


@pytest.fixture
def offline(monkeypatch):
    for name in ("HF_HUB_CACHE", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return monkeypatch


def hub_lookup(revision: str = "main") -> tuple[Path, Path]:
    """huggingface_hub's offline answers under this process's environment, in a fresh interpreter (it reads
    HF_HUB_CACHE / HF_HOME when imported): the snapshot directory, and where config.json is found."""
    code = ("import sys; from huggingface_hub import snapshot_download as s, try_to_load_from_cache as t; "
            "print(s(sys.argv[1], revision=sys.argv[2], local_files_only=True)); "
            "print(t(sys.argv[1], 'config.json', revision=sys.argv[2]))")
    snapshot, config = run([sys.executable, "-c", code, REPO, revision]).stdout.split()
    return Path(snapshot), Path(config)


def export_report(binary, hf_model_id, written, out, *extra):
    report = out.with_suffix(".json")
    proc = export(binary, hf_model_id, written.root, out, 1, "--verify-device", "cpu", "--report", report, *extra)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_a_model_id_resolves_through_the_cache_as_huggingface_hub_does(adapter_job_bin, model, offline, tmp_path,
                                                                       variable):
    root, base, cache, snapshots, written = model
    offline.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else cache.parent))
    # huggingface_hub's own offline lookups find the snapshot this test laid out.
    assert hub_lookup() == (snapshots[MAIN], snapshots[MAIN] / "config.json")

    proc, report = export_report(adapter_job_bin, REPO, written, tmp_path / "out")
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert str(snapshots[MAIN]) in report["base_model_resolved"] and f"base model: '{REPO}'" in proc.stdout
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO
    assert report["verification"]["base_model"] == REPO

    # The same adapter as from the plain directory, but for the name it records.
    proc, _ = export_report(adapter_job_bin, base, written, tmp_path / "plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["base_model_name_or_path"] == str(base) and {**plain, "base_model_name_or_path": REPO} == config


def test_revision_picks_a_tag_or_a_commit_and_a_missing_one_is_named(adapter_job_bin, model, offline, tmp_path):
    root, base, cache, snapshots, written = model
    offline.setenv("HF_HUB_CACHE", str(cache))
    for revision in ("v1", TAGGED):
        assert hub_lookup(revision)[0] == snapshots[TAGGED]
        proc, report = export_report(adapter_job_bin, REPO, written, tmp_path / revision[:8], "--revision", revision,
                                     "--no-verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert str(snapshots[TAGGED]) in report["base_model_resolved"], report["base_model_resolved"]
    proc, _ = export_report(adapter_job_bin, REPO, written, tmp_path / "v2", "--revision", "v2")
    assert proc.returncode == 2 and "not at revision 'v2'" in proc.stderr and "refs/v2" in proc.stderr, proc.stderr
    assert not (tmp_path / "v2").exists()


def test_a_snapshot_directory_records_its_model_id_unless_told_otherwise(adapter_job_bin, model, offline, tmp_path):
    root, base, cache, snapshots, written = model
    proc, _ = export_report(adapter_job_bin, snapshots[MAIN], written, tmp_path / "snap")
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "snap" / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    proc, _ = export_report(adapter_job_bin, snapshots[MAIN], written, tmp_path / "named",
                            "--base-model-name-or-path", "meta-llama/Llama-3.2-1B")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "named" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.2-1B"


def test_a_model_the_cache_lacks_is_only_recorded_and_cannot_be_verified(adapter_job_bin, model, offline, tmp_path):
    root, base, cache, snapshots, written = model
    offline.setenv("HF_HUB_CACHE", str(cache))
    proc, _ = export_report(adapter_job_bin, "acme/elsewhere", written, tmp_path / "out")
    assert proc.returncode == 2 and "is not a local directory" in proc.stderr, proc.stderr
    proc, _ = export_report(adapter_job_bin, "acme/elsewhere", written, tmp_path / "out", "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "acme/elsewhere"
    proc, _ = export_report(adapter_job_bin, "not a model", written, tmp_path / "bad", "--no-verify")
    assert proc.returncode == 2 and "neither a local directory nor a model id" in proc.stderr, proc.stderr


def test_verify_and_merge_take_the_model_id(adapter_job_bin, model, offline, tmp_path):
    root, base, cache, snapshots, written = model
    offline.setenv("HF_HUB_CACHE", str(cache))
    proc, _ = export_report(adapter_job_bin, REPO, written, tmp_path / "adapter")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = tmp_path / "verify.json"
    proc = run([adapter_job_bin, "verify", "--hf-model-id", REPO, "--hf-adapter-path", tmp_path / "adapter",
                "--megatron-peft-checkpoint", written.root, "--verify-device", "cpu", "--report", report], check=False)
    assert proc.returncode == 0 and json.loads(report.read_text())["passed"], proc.stdout + proc.stderr
    proc = run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--hf-model-id", REPO, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", tmp_path / "merged", "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    # The merge copies the snapshot's files: the config the cache holds, not a symlink into it.
    merged_config = tmp_path / "merged" / "config.json"
    assert not merged_config.is_symlink() and merged_config.read_bytes() == (base / "config.json").read_bytes()
    assert set(load_file(tmp_path / "merged" / "model.safetensors")) == set(load_file(base / "model.safetensors"))


def test_without_hf_model_id_the_checkpoints_recorded_base_is_used(adapter_job_bin, model, offline, tmp_path):
    """run_config.yaml's model.hf_model_id (Megatron-Bridge records the model it fine-tuned) stands in for a missing
    --hf-model-id in export and verify, resolved through the cache like a given one; a checkpoint that records none is
    an error naming its run_config.yaml. merge, whose every rank reads the base, needs it named."""
    root, base, cache, snapshots, written = model
    offline.setenv("HF_HUB_CACHE", str(cache))
    recorded = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", hf_model_id=REPO))
    out = tmp_path / "out"
    proc = run([adapter_job_bin, "export", "--megatron-peft-checkpoint", recorded.root, "--output-hf-path", out,
                "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    proc = run([adapter_job_bin, "verify", "--hf-adapter-path", out, "--megatron-peft-checkpoint", recorded.root,
                "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stdout + proc.stderr
    proc = run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--megatron-peft-checkpoint", recorded.root,
                "--output-hf-path", tmp_path / "merged", "--verify-device", "cpu"], check=False)
    assert proc.returncode == 2 and "merge needs --hf-model-id" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "merged").exists()

    unrecorded = write_checkpoint(CheckpointConfig(out=tmp_path / "none"))
    proc = run([adapter_job_bin, "export", "--megatron-peft-checkpoint", unrecorded.root, "--output-hf-path",
                tmp_path / "no", "--no-verify"], check=False)
    assert proc.returncode == 2 and "records no model.hf_model_id" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "no").exists()
