"""`--dry-run` (issue 16, part 4): the plan of an export, a stream or a merge, made and checked as the run makes
it, printed, with nothing written and exit 0. Held to what the real run then writes (file sizes, the tensors as
the safetensors library reads them, adapter_config.json), to the bytes each rank reads as torch's own
FileSystemReader locates the adapter chunks, and to the prompts verification then runs on; and it fails where the
run would fail before writing."""
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from test_export import adapter_bytes_per_file, adapter_job
from tiny_llama import TinyLlamaConfig, build_tiny_llama


def listing(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included: a dry run must leave no staging behind either."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def dry_run_json(binary, command, np, *args, cwd) -> dict:
    before = listing(cwd)
    proc = adapter_job(binary, command, np, *args, "--dry-run=json", cwd=cwd)
    assert listing(cwd) == before, "a dry run wrote something"
    return json.loads(proc.stdout)


def planned_files(plan: dict, root: Path) -> dict[str, int]:
    return {Path(f["path"]).resolve().relative_to(root.resolve()).as_posix(): f["bytes"]
            for f in plan["output"]["files"]}


def written_files(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A generated Llama (without tokenizer.json) and its TP2 checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_llama(TinyLlamaConfig(), root / "base")
    written = write_checkpoint(CheckpointConfig(out=root / "ckpt", base_model=base, tp=2))
    return base, written


def test_export_plan_is_what_the_export_writes_and_reads(adapter_job_bin, mb_fixtures, tmp_path):
    """Megatron-Bridge's TP2 x PP2 checkpoint at 2 ranks: every figure of the plan, against the real export."""
    lora = mb_fixtures / "tp2pp2" / "lora"
    ckpt = lora / "megatron_ckpt"
    args = ["--hf-model-id", str(mb_fixtures / "hf_base"), "--megatron-peft-checkpoint", str(ckpt),
            "--output-hf-path", "adapter", "--report", "report.json"]
    plan = dry_run_json(adapter_job_bin, "export", 2, *args, cwd=tmp_path)
    assert plan["dry_run"] is True
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "report.json").exists()

    adapter_job(adapter_job_bin, "export", 2, *args, cwd=tmp_path)
    out = tmp_path / "adapter"
    report = json.loads((tmp_path / "report.json").read_text())

    # The files, to the byte, and the report where the plan said.
    assert planned_files(plan, out) == written_files(out)
    assert Path(plan["output"]["report"]) == (tmp_path / "report.json").resolve()
    # The tensors as the safetensors library reads the file, in any order.
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        actual = {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}
    dtype_names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    planned = {t["name"]: (t["dtype"], t["shape"]) for t in plan["output"]["tensors"]}
    assert planned == {k: (dtype_names[d], s) for k, (d, s) in actual.items()}
    assert plan["output"]["tensor_bytes"] == report["tensor_bytes"]
    assert plan["output"]["adapter_config"] == json.loads((out / "adapter_config.json").read_text())

    # Reads: the adapter chunks' bytes as torch locates them, split over the ranks as the export read them.
    per_rank = plan["ranks"]["reads"]
    assert plan["ranks"]["count"] == 2 and [r["rank"] for r in per_rank] == [0, 1]
    assert [r["bytes"] for r in per_rank] == report["bytes_read_per_rank"]
    by_file = {}
    for r in per_rank:
        for f in r["files"]:
            assert f["file"] not in by_file, f"{f['file']} read by two ranks"
            by_file[f["file"]] = f["bytes"]
    assert by_file == dict(adapter_bytes_per_file(Path(plan["checkpoint"]["iteration_dir"])))
    assert Path(plan["checkpoint"]["iteration_dir"]) == Path(report["provenance"]["iteration_dir"])

    # Verification: the device and prompts the export's verification then ran on.
    v = report["verification"]
    assert plan["verification"]["device"] == v["device"]
    assert [p["token_ids"] for p in plan["verification"]["prompts"]] == [p["token_ids"] for p in v["prompts"]]
    assert plan["verification"]["prompts"][0]["prompt"] == "The capital of France is"


def test_text_plan_and_skipped_steps(adapter_job_bin, tiny, tmp_path):
    base, written = tiny
    args = ["--hf-model-id", str(base), "--megatron-peft-checkpoint", str(written.root), "--output-hf-path", "a",
            "--wait", "5", "--result", "result.json"]
    plan = dry_run_json(adapter_job_bin, "export", None, *args, cwd=tmp_path)
    # No tokenizer.json: the synthetic ids verification uses, said to be so.
    assert [p["synthetic"] for p in plan["verification"]["prompts"]] == [True]
    assert len(plan["verification"]["prompts"][0]["token_ids"]) == 16
    assert any(n.startswith("--wait: not waited for") for n in plan["notes"])
    assert any(n.startswith("--result: not written") for n in plan["notes"])

    before = listing(tmp_path)
    text = adapter_job(adapter_job_bin, "export", None, *args, "--dry-run", cwd=tmp_path).stdout
    assert listing(tmp_path) == before
    assert text.startswith("dry run: nothing was written\n")
    assert "prompt (synthetic token ids): 16 tokens" in text
    tensor_lines = [line for line in text.splitlines() if line.startswith("  base_model.model.")]
    assert [line.split()[0] for line in tensor_lines] == [t["name"] for t in plan["output"]["tensors"]]

    skipped = dry_run_json(adapter_job_bin, "export", None, *args, "--no-verify", cwd=tmp_path)
    assert skipped["verification"] is None and skipped["verification_skipped"] == "--no-verify was given"


def test_dry_run_fails_where_the_run_would(adapter_job_bin, tiny, tmp_path):
    base, written = tiny
    common = ["--hf-model-id", str(base), "--megatron-peft-checkpoint", str(written.root)]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("not the tool's")
    cases = {
        "an existing output": (["--output-hf-path", "taken"], "already exists (pass --overwrite"),
        "a foreign file in the output, with --overwrite": (
            ["--output-hf-path", "taken", "--overwrite"], "holds 'mine.txt'"),
        "a prompt outside the vocabulary": (["--output-hf-path", "b", "--prompt-ids", "999999"],
                                            "outside the vocabulary of 256"),
        "an unknown format": (["--output-hf-path", "b"], "--dry-run must be text or json"),
    }
    for what, (extra, message) in cases.items():
        before = listing(tmp_path)
        dry_flag = "--dry-run=yaml" if what == "an unknown format" else "--dry-run"
        dry = adapter_job(adapter_job_bin, "export", None, *common, *extra, dry_flag, check=False, cwd=tmp_path)
        assert dry.returncode == 2 and message in dry.stderr, (what, dry.returncode, dry.stderr)
        assert dry.stdout == "" and listing(tmp_path) == before, what
        if what == "an unknown format":
            continue
        real = adapter_job(adapter_job_bin, "export", None, *common, *extra, check=False, cwd=tmp_path)
        assert real.returncode == 2 and message in real.stderr, (what, real.stderr)
        assert listing(tmp_path) == before, what
    # An output it may replace: said so, and still nothing written.
    (tmp_path / "taken" / "mine.txt").unlink()
    plan = dry_run_json(adapter_job_bin, "export", None, *common, "--output-hf-path", "taken", "--overwrite",
                        cwd=tmp_path)
    assert any("would be replaced" in n for n in plan["notes"])


def test_merge_plan_lists_the_shards_each_rank_writes(adapter_job_bin, tiny, tmp_path):
    base, written = tiny
    args = ["--hf-model-id", str(base), "--megatron-peft-checkpoint", str(written.root), "--output-hf-path",
            "merged", "--max-shard-size", "40KB", "--no-verify"]
    plan = dry_run_json(adapter_job_bin, "merge", 2, *args, cwd=tmp_path)
    adapter_job(adapter_job_bin, "merge", 2, *args, cwd=tmp_path)
    files = written_files(tmp_path / "merged")
    assert len([f for f in files if f.endswith(".safetensors")]) > 2
    assert planned_files(plan, tmp_path / "merged") == files
    writers = {Path(f["path"]).name: f["what"] for f in plan["output"]["files"] if f["path"].endswith(".safetensors")}
    assert any("rank 1" in w or "ranks 0-1" in w for w in writers.values()), writers
    # Which rank writes which tensor, as the index and the shards hold it: each shard's tensors.
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(writers)


def test_stream_plan_is_the_file_streamed(adapter_job_bin, tiny, tmp_path):
    base, written = tiny
    args = ["--hf-model-id", str(base), "--megatron-peft-checkpoint", str(written.root), "--output", "t.safetensors"]
    plan = dry_run_json(adapter_job_bin, "stream", None, *args, cwd=tmp_path)
    adapter_job(adapter_job_bin, "stream", None, *args, cwd=tmp_path)
    assert planned_files(plan, tmp_path) == written_files(tmp_path)
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(t["name"] for t in plan["output"]["tensors"])
    assert plan["verification"] is None and plan["verification_skipped"] == "this output is never verified"
    assert plan["output"]["adapter_config"] is None
