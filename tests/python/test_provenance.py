"""Provenance (issue 16, part 4): `adapter_job version --json`, and the run report's record of where an output came
from (the tool's version and commit, the command line, the checkpoint and its run_config.yaml's sha256, and each
output file's size and sha256), held to git, hashlib and the files as published."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from tiny_llama import TinyLlamaConfig, build_tiny_llama

REPO = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_version_json_says_what_the_text_says(adapter_job_bin):
    text = run([adapter_job_bin, "version"]).stdout
    got = json.loads(run([adapter_job_bin, "version", "--json"]).stdout)
    assert list(got) == ["version", "git_commit", "config_dir", "verification", "cuda"]
    assert text.splitlines()[0] == f"adapter_job {got['version']}"
    assert f"commit: {got['git_commit']}" in text
    if shutil.which("git") and (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        assert got["git_commit"] == head
    assert got["verification"]["built"] in (True, False) and isinstance(got["cuda"]["gpus"], int)


def test_report_records_tool_command_checkpoint_and_output_hashes(adapter_job_bin, tmp_path):
    base = build_tiny_llama(TinyLlamaConfig(), tmp_path / "base")
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", base_model=base))
    version = json.loads(run([adapter_job_bin, "version", "--json"]).stdout)
    for command, out in (("export", tmp_path / "adapter"), ("merge", tmp_path / "merged")):
        report = tmp_path / f"{command}.json"
        args = ["--hf-model-id", str(base), "--megatron-peft-checkpoint", str(written.root), "--output-hf-path",
                str(out), "--no-verify", "--report", str(report)]
        run([adapter_job_bin, command, *args])
        p = json.loads(report.read_text())["provenance"]
        assert p["tool_version"] == version["version"] and p["git_commit"] == version["git_commit"]
        assert p["command_line"] == ["adapter_job", command, *args]
        assert p["checkpoint"] == str(written.root) and p["iteration"] == 1
        assert Path(p["iteration_dir"]) == written.iter_dir
        assert p["run_config_sha256"] == sha256(written.iter_dir / "run_config.yaml")
        published = sorted(f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file())
        assert [f["name"] for f in p["output_files"]] == published
        for f in p["output_files"]:
            assert f["bytes"] == (out / f["name"]).stat().st_size
            if command == "merge" and f["name"].endswith(".safetensors"):
                assert "sha256" not in f  # weight shards by size, as --result records them
            else:
                assert f["sha256"] == sha256(out / f["name"]), f["name"]
        if command == "export":
            assert {f["name"] for f in p["output_files"]} == {"adapter_config.json", "adapter_model.safetensors"}


def test_the_adapters_digest_taken_while_it_is_written_is_hashlibs(adapter_job_bin, tmp_path):
    """The adapter's sha256 is computed as it is written (the export does not read it again). Twelve layers arrive in
    layer order over two ranks while the file holds them in name order (layers.1, layers.10, ..., layers.2), and the
    12 MB file spans several of the digest's 8 MiB read pieces: the recorded digest must still be hashlib's."""
    dims = dict(hidden=512, heads=8, kv_heads=4, head_dim=64, ffn=1024)
    base = build_tiny_llama(TinyLlamaConfig(layers=12, **dims), tmp_path / "base")
    written = write_checkpoint(CheckpointConfig(
        out=tmp_path / "ckpt", base_model=base, tp=2, pp=2, num_layers=12, hidden=512, heads=8, query_groups=4,
        head_dim=64, ffn=1024, dim=64, write_expected=False))
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", adapter_job_bin, "export", "--hf-model-id",
         str(base), "--megatron-peft-checkpoint", str(written.root), "--output-hf-path", str(out), "--no-verify",
         "--report", str(report)])
    weights = out / "adapter_model.safetensors"
    assert weights.stat().st_size > 8 << 20, "spans more than one read piece"
    files = {f["name"]: f for f in json.loads(report.read_text())["provenance"]["output_files"]}
    assert files["adapter_model.safetensors"]["sha256"] == sha256(weights)
    assert files["adapter_model.safetensors"]["bytes"] == weights.stat().st_size
