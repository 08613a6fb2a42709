"""The verdict and the contract around it (issue 12, items 1-3): figures computed far below their thresholds'
own rounding at real vocabulary sizes, verification that was asked for never skipped quietly, a failed verdict
always said, and no input ever lost or silently replaced.

Every case here failed on the code before these fixes: float32 check figures false-failed a correct export with a
128k or 262k vocabulary; a missing base path was taken for a model id and published unverified with exit 0;
`verify` against the wrong base crashed with a libtorch backtrace (exit 1); `verify -q` printed nothing on a failed
verdict; `--overwrite` onto the checkpoint or the base model deleted it; an old `.unverified` output was replaced
without `--overwrite`; SIGTERM left a hidden staging directory behind.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from test_export_bad_input import writable_copy
from tiny_llama import TinyLlamaConfig, build_tiny_llama

BAD_INPUT, FAILED = 2, 3
HF = "hf_base"
CKPT = "tp1pp1/lora/megatron_ckpt"
MIN_COSINE = 1 - 1e-6  # the threshold of peft_vs_merged_min_cosine


def export(binary, hf, ckpt, out, *extra, check=False, timeout=300):
    return run([binary, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt, "--output-hf-path", out,
                *extra], check=check, timeout=timeout)


def errors_of(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line]


def tree(path: Path) -> dict:
    """Every file under `path` with its bytes: an input must come out of a run exactly as it went in."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# 1. The figures at real vocabulary sizes

def float32_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What the old code computed: a float32 cosine over each logit row (at::cosine_similarity)."""
    return torch.nn.functional.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=1).double().numpy()


def float64_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("vocab", [128_256, 262_144])
def test_correct_export_passes_at_real_vocabulary_sizes(adapter_job_bin, tmp_path, vocab):
    """Llama-3.2-1B's width (hidden 2048, 16 heads of 128, 8 KV groups, tied embeddings) with a 128k (Llama 3) and a
    262k (Gemma 3) vocabulary: a correct r16 LoRA export must pass, with the cosine computed exactly enough."""
    dims = dict(hidden=2048, heads=16, head_dim=128, ffn=512)
    base = build_tiny_llama(TinyLlamaConfig(layers=1, kv_heads=8, vocab=vocab, tie_word_embeddings=True, **dims),
                            tmp_path / "base")
    # A direction every (tied) embedding shares, as trained unembeddings have: each position's logits get a large
    # common offset (|logit| up to a few hundred), where a float32 cosine of a row with itself falls below 1 - 1e-6.
    weights = load_file(base / "model.safetensors")
    weights["model.embed_tokens.weight"] = (weights["model.embed_tokens.weight"].float() + 1.0).to(torch.bfloat16)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", num_layers=1, query_groups=8, dim=16,
                                                alpha=32, base_model=base, **dims))
    out, report, h5 = tmp_path / "adapter", tmp_path / "report.json", tmp_path / "logits.h5"
    proc = export(adapter_job_bin, base, written.root, out, "--verify-device", "cpu", "--report", report,
                  "--verify-h5", h5)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "adapter_model.safetensors").exists()
    checks = {c["name"]: c for c in json.loads(report.read_text())["verification"]["checks"]}

    with h5py.File(h5, "r") as f:
        rows = [(f[f"prompts/{i}/logits/peft"][()], f[f"prompts/{i}/logits/merged"][()]) for i in range(len(f["prompts"]))]
    assert rows[0][0].shape[1] == vocab
    exact = min(float64_cosine(p, m).min() for p, m in rows)
    old = min(float32_cosine(p, m).min() for p, m in rows)
    # The case is one where a float32 figure is wrong by more than 1e-7 (a tenth of the threshold's distance)...
    assert abs(old - exact) > 1e-7, (old, exact)
    # ... and the reported figure is the exact one, with margin to the threshold (the old float32 figure was below it:
    # "FAIL peft_vs_merged_min_cosine 0.999999 >= 0.999999" with every logit equal).
    figure = checks["peft_vs_merged_min_cosine"]["figure"]
    assert abs(figure - exact) < 1e-12, (figure, exact)
    assert 1 - figure < 0.1 * (1 - MIN_COSINE), figure
    if checks["peft_vs_merged_max_abs_diff"]["figure"] == 0:
        assert figure == 1.0  # a row compared with itself
    mean = checks["peft_vs_merged_mean_abs_diff"]
    assert mean["figure"] == pytest.approx(np.mean([np.abs(p.astype(np.float64) - m).mean() for p, m in rows]),
                                           rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# 2. Verification asked for but impossible, or failed, is never a quiet success

@pytest.mark.parametrize("hf", ["./no_such_model", "../no_such_model", "/no/such/model", "models/typo"])
def test_a_missing_path_is_an_error_not_a_model_id(adapter_job_bin, mb_fixtures, tmp_path, hf):
    (tmp_path / "models").mkdir()  # an existing parent makes "models/typo" a path
    for extra in ([], ["--no-verify"]):
        proc = run([adapter_job_bin, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", mb_fixtures / CKPT,
                    "--output-hf-path", tmp_path / "out", *extra], check=False, cwd=tmp_path)
        assert proc.returncode == BAD_INPUT, proc.stdout + proc.stderr
        assert "does not exist" in proc.stderr and hf in proc.stderr
        assert not (tmp_path / "out").exists()


def test_a_model_id_or_a_config_only_dir_cannot_be_verified(adapter_job_bin, mb_fixtures, tmp_path):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(mb_fixtures / HF / "config.json", config_only)
    for hf, missing in (("org/base-model", "not a local directory"), (config_only, "no model.safetensors")):
        out = tmp_path / "out"
        for extra in ([], ["--verify"], ["-q"]):
            proc = export(adapter_job_bin, hf, mb_fixtures / CKPT, out, *extra)
            assert proc.returncode == BAD_INPUT, proc.stdout + proc.stderr
            assert missing in proc.stderr and "--no-verify" in proc.stderr
            assert not out.exists() and not Path(f"{out}.unverified").exists()
        report = tmp_path / "report.json"
        proc = export(adapter_job_bin, hf, mb_fixtures / CKPT, out, "--no-verify", "--report", report)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(report.read_text())
        assert got["verified"] is False and got["verification_skipped"] == "--no-verify was given"
        assert "not verified" in proc.stderr
        shutil.rmtree(out)


def test_the_report_says_verified(adapter_job_bin, mb_fixtures, tmp_path):
    report = tmp_path / "report.json"
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, tmp_path / "out", "--report", report)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(report.read_text())
    assert got["verified"] is True and "verification_skipped" not in got and got["verification"]["passed"] is True


def wrong_base(mb_fixtures, tmp_path) -> Path:
    """hf_base with a wider MLP (ffn 192 instead of 128): every adapter of the MLP is the wrong shape for it."""
    config = json.loads((mb_fixtures / HF / "config.json").read_text())
    config["intermediate_size"] = 192
    weights = load_file(mb_fixtures / HF / "model.safetensors")
    for name, t in list(weights.items()):
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            weights[name] = torch.cat([t, t[:64]], 0)
        elif name.endswith("down_proj.weight"):
            weights[name] = torch.cat([t, t[:, :64]], 1)
    out = tmp_path / "wrong_base"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_verify_against_the_wrong_base_is_bad_input_naming_module_and_shapes(adapter_job_bin, mb_fixtures, tmp_path):
    base = wrong_base(mb_fixtures, tmp_path)
    proc = run([adapter_job_bin, "verify", "--hf-model-id", base, "--hf-adapter-path",
                mb_fixtures / "tp1pp1/lora/mb_export_adapter", "--megatron-peft-checkpoint", mb_fixtures / CKPT,
                "--prompt-ids", "1,2,3"], check=False, timeout=120)
    assert proc.returncode == BAD_INPUT, proc.stdout + proc.stderr
    assert "Exception raised from" not in proc.stderr and "frame #" not in proc.stderr  # no libtorch backtrace
    line = errors_of(proc)[-1]
    assert "mlp" in line and "192" in line and "128" in line, line


def broken_adapter(mb_fixtures, tmp_path) -> Path:
    """Megatron-Bridge's own export with one lora_B doubled: loads fine, gives other logits than the merge."""
    adapter = tmp_path / "broken"
    shutil.copytree(mb_fixtures / "tp1pp1/lora/mb_export_adapter", adapter)
    adapter.chmod(0o755)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("v_proj.lora_B.weight"))
    tensors[key] = tensors[key] * 2
    (adapter / "adapter_model.safetensors").chmod(0o644)
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return adapter


@pytest.mark.parametrize("level", [["-q"], ["--log-level", "error"], ["--log-level", "warning"], []])
def test_a_failed_verdict_is_said_at_every_log_level(adapter_job_bin, mb_fixtures, tmp_path, level):
    proc = run([adapter_job_bin, "verify", "--hf-model-id", mb_fixtures / HF, "--hf-adapter-path",
                broken_adapter(mb_fixtures, tmp_path), "--megatron-peft-checkpoint", mb_fixtures / CKPT,
                "--prompt-ids", "1,2,3,4,5,6,7,8", *level], check=False, timeout=120)
    assert proc.returncode == FAILED, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "verification FAILED:" in line]
    assert len(failed) == 1, proc.stderr
    assert "peft_vs_merged_max_abs_diff" in failed[0] and "must be <=" in failed[0]


# ---------------------------------------------------------------------------------------------------------------
# 3. No input is ever lost or silently replaced

@pytest.fixture
def inputs(mb_fixtures, tmp_path):
    """Writable copies of the base model and the checkpoint, side by side under one parent."""
    root = tmp_path / "inputs"
    return (writable_copy(mb_fixtures / HF, root / "base"), writable_copy(mb_fixtures / CKPT, root / "ckpt"))


@pytest.mark.parametrize("target", ["ckpt", "iter", "base", "parent", "inside_base"])
def test_overwrite_never_replaces_an_input(adapter_job_bin, inputs, target):
    base, ckpt = inputs
    out = {"ckpt": ckpt, "iter": ckpt / "iter_0000001", "base": base, "parent": base.parent,
           "inside_base": base / "adapter"}[target]
    before = tree(base.parent)
    proc = export(adapter_job_bin, base, ckpt, out, "--overwrite")
    assert proc.returncode == BAD_INPUT, proc.stdout + proc.stderr
    assert "must never be written over an input" in proc.stderr
    assert tree(base.parent) == before


def test_overwrite_replaces_only_an_adapter(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, out, "--overwrite")
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert "notes.txt" in proc.stderr and (out / "notes.txt").read_text() == "mine"

    # An earlier adapter (with the model card PEFT writes beside it) is replaced, atomically, leaving nothing else.
    (out / "notes.txt").unlink()
    shutil.copytree(mb_fixtures / "tp1pp1/lora/mb_export_adapter", out, dirs_exist_ok=True)
    (out / "README.md").write_text("card")
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or .previous left beside it


def test_an_old_unverified_output_is_kept_without_overwrite(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "out"
    unverified = tmp_path / "out.unverified"
    unverified.write_text("not ours")
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, out)
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert "out.unverified" in proc.stderr and "--overwrite" in proc.stderr
    assert unverified.read_text() == "not ours" and not out.exists()


def test_a_report_that_cannot_be_written_publishes_nothing(adapter_job_bin, mb_fixtures, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "a_file").write_text("not a directory")
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, out, "--report",
                  tmp_path / "a_file" / "report.json")
    assert proc.returncode == BAD_INPUT, proc.stderr
    assert "a_file" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    # Missing directories are made for it, as for the output, once there is something to write.
    report = tmp_path / "reports" / "run" / "report.json"
    proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["published"] == str(out)


def test_sigterm_removes_the_staging_directory(adapter_job_bin, mb_fixtures, tmp_path):
    """Slurm's scancel and time limit send SIGTERM: the staged adapter (complete, not yet verified) must go."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    # A long prompt list keeps verification busy long enough to be stopped during it.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i} about the capital of France" for i in range(3000)))
    proc = subprocess.Popen([adapter_job_bin, "export", "--hf-model-id", mb_fixtures / HF,
                             "--megatron-peft-checkpoint", mb_fixtures / CKPT, "--output-hf-path", parent / "adapter",
                             "--prompts-file", prompts, "--verify-device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(parent.glob(".adapter.partial-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no staging directory appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert list(parent.iterdir()) == []


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def test_a_killed_runs_staging_is_removed_and_a_live_ones_kept(adapter_job_bin, mb_fixtures, tmp_path):
    parent = tmp_path / "outputs"
    parent.mkdir()
    host = "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())
    child = subprocess.Popen(["sleep", "60"])
    try:
        staged = {
            "dead": parent / f".adapter.partial-{host}-{os.getpid() + 10**6}-123-abcdef",
            "reused_pid": parent / f".adapter.partial-{host}-{child.pid}-{start_time(child.pid) + 1}-ghijkl",
            "live": parent / f".adapter.partial-{host}-{child.pid}-{start_time(child.pid)}-mnopqr",
            "other_host": parent / f".adapter.partial-otherhost-{os.getpid() + 10**6}-123-stuvwx",
            "foreign": parent / f".adapter.partial-{host}-{os.getpid() + 10**6}-123-yzabcd",
        }
        for name, path in staged.items():
            path.mkdir()
            (path / "adapter_config.json").write_text("{}")
        (staged["foreign"] / "thesis.tex").write_text("mine")
        proc = export(adapter_job_bin, mb_fixtures / HF, mb_fixtures / CKPT, parent / "adapter", "--no-verify")
        assert proc.returncode == 0, proc.stderr
        left = {name for name, path in staged.items() if path.exists()}
        assert left == {"live", "other_host", "foreign"}
    finally:
        child.kill()
        child.wait()
