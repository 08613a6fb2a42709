"""Bounded resources on hostile input: a FIFO, a directory or a device in place of an input file, and inputs
built to blow up time or memory, each fail fast with exit 2 and one message naming the file (and key).
FIFO cases run under a timeout, so a regression fails instead of hanging the suite."""
import os
import subprocess
from pathlib import Path

import pytest

from conftest import run
from test_export_bad_input import writable_copy

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
TIMEOUT = 20


@pytest.fixture
def run_dir(mb_fixtures, tmp_path):
    """A writable copy of Megatron-Bridge's TP1PP1 checkpoint (the run directory)."""
    return writable_copy(mb_fixtures / "tp1pp1/lora/megatron_ckpt", tmp_path / "ckpt")


def expect_bad_input(cmd, *fragments, timeout=TIMEOUT) -> str:
    try:
        proc = run(cmd, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd[0]} still running after {timeout} s (blocked on a FIFO or device?)")
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "internal error" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0], f"missing {fragment!r} in: {errors[0]}"
    return errors[0]


def replace_with(path: Path, kind: str) -> None:
    """Puts a FIFO, a directory or a link to /dev/zero where `path` was."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")


KIND_WORDS = {"fifo": "a FIFO", "directory": "a directory", "dev_zero": "a character device"}
CHECKPOINT_FILES = ["iter_0000001/.metadata", "iter_0000001/run_config.yaml", "iter_0000001/metadata.json",
                    "iter_0000001/integrity.json", "latest_checkpointed_iteration.txt"]


@pytest.mark.parametrize("kind", list(KIND_WORDS))
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_checkpoint_file_that_is_not_regular(adapter_job_bin, run_dir, name, kind):
    target = run_dir / name
    replace_with(target, kind)
    # The run directory, not iter_*, so that the latest-iteration marker is read too.
    expect_bad_input([adapter_job_bin, "inspect", run_dir], target, "not a regular file", KIND_WORDS[kind])


@pytest.mark.parametrize("kind", list(KIND_WORDS))
def test_shard_file_that_is_not_regular(tools_dir, run_dir, tmp_path, kind):
    shard = run_dir / "iter_0000001/__0_0.distcp"
    replace_with(shard, kind)
    expect_bad_input([tools_dir / "dcp_dump", run_dir / "iter_0000001", tmp_path / "o.safetensors"], shard,
                     "not a regular file")


@pytest.mark.parametrize("kind", list(KIND_WORDS))
def test_model_safetensors_that_is_not_regular(tools_dir, mb_fixtures, tmp_path, kind):
    model = writable_copy(mb_fixtures / "hf_base", tmp_path / "hf") / "model.safetensors"
    replace_with(model, kind)
    expect_bad_input([tools_dir / "safetensors_copy", model, tmp_path / "o.safetensors"], model,
                     "not a regular file", KIND_WORDS[kind])


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_verify_base_model_file_that_is_a_fifo(adapter_job_bin, mb_fixtures, tmp_path, name):
    hf = writable_copy(mb_fixtures / "hf_base", tmp_path / "hf")
    replace_with(hf / name, "fifo")
    expect_bad_input([adapter_job_bin, "verify", "--hf-model-id", hf, "--hf-adapter-path",
                      mb_fixtures / "tp1pp1/lora/mb_export_adapter", "--verify-device", "cpu"],
                     hf / name, "not a regular file", timeout=60)


def test_config_file_that_is_a_fifo(adapter_job_bin, run_dir, tmp_path):
    config = tmp_path / "job.ini"
    os.mkfifo(config)
    expect_bad_input([adapter_job_bin, "export", "--config", config, "--megatron-peft-checkpoint", run_dir,
                      "--output-hf-path", tmp_path / "out"], config, "not a regular file")


# --- Declared sizes held to what the files hold ------------------------------------------------------------------

FC2_IN = "decoder.layers.mlp.linear_fc2.adapter.linear_in.weight"
PROJ_IN = "decoder.layers.self_attention.linear_proj.adapter.linear_in.weight"
PROJ_OUT = "decoder.layers.self_attention.linear_proj.adapter.linear_out.weight"


def load_metadata(iter_dir: Path):
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(iter_dir)).read_metadata()


def save_metadata(iter_dir: Path, meta) -> None:
    import pickle
    (iter_dir / ".metadata").write_bytes(pickle.dumps(meta))


def chunk_index(meta, key: str, layer: int):
    return next(i for i in meta.storage_data if i.fqn == key and i.offset is not None and i.offset[0] == layer)


def export(binary, hf, ckpt, out, np=1):
    return [*MPIRUN, "-np", str(np), binary, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt,
            "--output-hf-path", out, "--no-verify"]


def test_stride_zero_chunk_is_refused(tools_dir, run_dir, tmp_path):
    """A chunk stored as one element expanded by stride 0 to its whole shape: torch's DCP writer never writes one
    (it clones every tensor whose storage is not its own size), and it would turn a few stored bytes into
    gigabytes."""
    import io
    import torch
    iter_dir = run_dir / "iter_0000001"
    meta = load_metadata(iter_dir)
    index = chunk_index(meta, FC2_IN, 0)
    info = meta.storage_data[index]
    blob = io.BytesIO()
    torch.save(torch.ones(1, dtype=torch.bfloat16).expand(1, 8, 128), blob)
    shard = iter_dir / info.relative_path
    info.offset = shard.stat().st_size
    info.length = len(blob.getvalue())
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    save_metadata(iter_dir, meta)
    expect_bad_input([tools_dir / "dcp_dump", iter_dir, tmp_path / "o.safetensors"], shard, FC2_IN,
                     "1024 elements, but its storage holds 1")


def test_declared_bytes_beyond_the_files(adapter_job_bin, mb_fixtures, run_dir, tmp_path):
    """A .metadata that declares a rank-2^36 linear_proj adapter, 16 TiB, over the same small files: refused before
    anything is allocated for it (was bad_alloc in GatherLayers, exit 1). run_config.yaml keeps its dim: it may
    not declare such a rank itself (test_malformed_settings.py)."""
    import torch
    iter_dir = run_dir / "iter_0000001"
    meta = load_metadata(iter_dir)
    rank = 1 << 36
    for key, shape in [(PROJ_IN, [rank, 64]), (PROJ_OUT, [64, rank])]:
        entry = meta.state_dict_metadata[key]
        entry.size = torch.Size([4, *shape])
        for chunk in entry.chunks:
            chunk.sizes = torch.Size([1, *shape])
    save_metadata(iter_dir, meta)
    shard = iter_dir / meta.storage_data[chunk_index(meta, PROJ_IN, 0)].relative_path
    expect_bad_input(export(adapter_job_bin, mb_fixtures / "hf_base", run_dir, tmp_path / "out"), PROJ_IN, shard,
                     f"declares {rank * 64 * 2} bytes", timeout=60)


def test_chunks_that_share_bytes(adapter_job_bin, mb_fixtures, run_dir, tmp_path):
    """Two chunks pointing at one range of a file: torch's DCP writer gives each item its own bytes, and shared
    ranges would let a small file stand for any number of chunks."""
    iter_dir = run_dir / "iter_0000001"
    meta = load_metadata(iter_dir)
    meta.storage_data[chunk_index(meta, FC2_IN, 1)] = meta.storage_data[chunk_index(meta, FC2_IN, 0)]
    save_metadata(iter_dir, meta)
    expect_bad_input(export(adapter_job_bin, mb_fixtures / "hf_base", run_dir, tmp_path / "out"), FC2_IN,
                     "share bytes", timeout=60)


# --- Size caps ------------------------------------------------------------------------------------------------

def test_huge_token_id_is_refused(tools_dir, mb_fixtures, tmp_path):
    """One token id of 100M made a 5.5 GB id table; real vocabularies stay under 2^21 ids (Gemma 3: 262k)."""
    import json
    doc = json.loads((mb_fixtures / "hf_base/tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    vocab[next(iter(vocab))] = 100_000_000
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(doc))
    proc = run([tools_dir / "tokenize", path], check=False, input="", timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert str(path) in proc.stderr and "has id 100000000" in proc.stderr and "2097152" in proc.stderr, proc.stderr


def test_huge_prompt_is_refused(adapter_job_bin, mb_fixtures, tmp_path):
    """A 20 MB prompt was killed at 23.7 GB while being encoded: prompts are capped at 64 KiB (and 8192 tokens)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a" * 100_000 + "\n")
    expect_bad_input([adapter_job_bin, "verify", "--hf-model-id", mb_fixtures / "hf_base", "--hf-adapter-path",
                      mb_fixtures / "tp1pp1/lora/mb_export_adapter", "--verify-device", "cpu", "--prompts-file",
                      prompts], "100000 bytes, more than the 65536 allowed", timeout=60)
    ids = ",".join(["1"] * 9000)
    expect_bad_input([adapter_job_bin, "verify", "--hf-model-id", mb_fixtures / "hf_base", "--hf-adapter-path",
                      mb_fixtures / "tp1pp1/lora/mb_export_adapter", "--verify-device", "cpu", "--prompt-ids", ids],
                     "9000 tokens, more than the 8192 allowed", timeout=60)
    prompts.write_text("a\n" * 600_000)
    expect_bad_input([adapter_job_bin, "verify", "--hf-model-id", mb_fixtures / "hf_base", "--hf-adapter-path",
                      mb_fixtures / "tp1pp1/lora/mb_export_adapter", "--verify-device", "cpu", "--prompts-file",
                      prompts], prompts, "1200000 bytes", timeout=60)


def test_huge_run_config_is_refused(adapter_job_bin, run_dir):
    """yaml-cpp took ~125 bytes per byte (20 MB: 2.5 GB); Megatron-Bridge's run_config.yaml is ~22 KB."""
    config = run_dir / "iter_0000001/run_config.yaml"
    config.write_text(config.read_text() + "".join(f"padding_{i}: {'x' * 60}\n" for i in range(20_000)))
    expect_bad_input([adapter_job_bin, "inspect", run_dir], config, "more than the 1048576 allowed")


def test_huge_metadata_is_refused(adapter_job_bin, run_dir):
    """.metadata is capped at 256 MiB: a DeepSeek-V3-sized LoRA's is 19 MB (152 MB at ETP 8; bench/metadata_size.py),
    and a 67 MB hostile one took 12.6 GB to parse. The file here is sparse: nothing is written."""
    meta = run_dir / "iter_0000001/.metadata"
    with open(meta, "r+b") as f:
        f.truncate((256 << 20) + 1)
    expect_bad_input([adapter_job_bin, "inspect", run_dir], meta, f"{(256 << 20) + 1} bytes is more than the "
                     f"{256 << 20} allowed")


@pytest.mark.parametrize("opcode", [b"]", b"N", b"K\x00", b"]\x94"])
def test_hostile_metadata_memory_is_bounded(adapter_job_bin, run_dir, opcode):
    """8 MB of one opcode repeated: parsing stays within ~50 bytes per input byte (it was ~190: 1.5 GB here)."""
    meta = run_dir / "iter_0000001/.metadata"
    meta.write_bytes(b"\x80\x04" + opcode * ((8 << 20) // len(opcode)) + b".")
    cmd = [str(adapter_job_bin), "inspect", str(run_dir)]
    proc = subprocess.run(["/usr/bin/env", "python3", "-c",
                           "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
                           "text=True); sys.stderr.write(p.stderr); "
                           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)",
                           *cmd], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert str(meta) in proc.stderr and "pickle:" in proc.stderr, proc.stderr
    peak_kib = int(proc.stdout.strip())
    if "ASAN_OPTIONS" in os.environ:
        return  # the sanitized build's shadow memory and quarantine make RSS no measure of ours
    assert peak_kib < 60 * 8 * 1024 + 100 * 1024, f"peak RSS {peak_kib} KiB for 8 MiB of input"
