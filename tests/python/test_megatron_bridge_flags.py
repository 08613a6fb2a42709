"""Megatron-Bridge's flag names (issue 16, part 3), as its examples/conversion/adapter/export_adapter.py and
verify_adapter.py spell them: --hf-model-path, --lora-checkpoint, --output, --dtype float32/bfloat16 (any case,
torch. in front), --tp/--pp/--ep/--etp, --sequence-parallel, and verify's --cpu; and --iteration N.

On Megatron-Bridge's own TP2 x PP2 checkpoint, its spellings give the same bytes as ours. The parallel sizes are the
checkpoint's: stated ones are checked, never used. Boost's prefix guessing is off, so a shortened or mistyped option
is an error rather than another option."""
import json

import pytest

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from test_families import MPIRUN
from tiny_llama import TinyLlamaConfig, build_tiny_llama

CKPT = "tp2pp2/lora/megatron_ckpt"


def export(binary, *args, ranks=2):
    return run([*MPIRUN, "-np", str(ranks), binary, "export", *args], check=False)


@pytest.fixture(scope="module")
def ours(adapter_job_bin, mb_fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("flags") / "ours"
    proc = export(adapter_job_bin, "--hf-model-id", mb_fixtures / "hf_base", "--megatron-peft-checkpoint",
                  mb_fixtures / CKPT, "--output-hf-path", out, "--dtype", "bf16", "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "BF16", "torch.bfloat16"])
def test_megatron_bridge_spellings_give_our_bytes(adapter_job_bin, mb_fixtures, ours, tmp_path, dtype):
    out = tmp_path / "theirs"
    proc = export(adapter_job_bin, "--hf-model-path", mb_fixtures / "hf_base", "--lora-checkpoint", mb_fixtures / CKPT,
                  "--output", out, "--dtype", dtype, "--tp", "2", "--pp", "2", "--ep", "1", "--etp", "2",
                  "--sequence-parallel", "--trust-remote-code", "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (ours / name).read_bytes(), name


@pytest.mark.parametrize("flags,message", [
    (("--tp", "4"), "--tp 4 does not match the checkpoint's tensor_model_parallel_size 2"),
    (("--pp", "1"), "--pp 1 does not match the checkpoint's pipeline_model_parallel_size 2"),
    (("--etp", "1"), "--etp 1 does not match the checkpoint's expert_tensor_parallel_size 2"),
    (("--hf-model-id", "x/y"), "--hf-model-id and --hf-model-path (Megatron-Bridge's spelling) are the same option"),
    (("--dtype", "float64"), "--dtype must be auto, bf16, fp16 or fp32"),
])
def test_disagreeing_flags_are_errors_that_write_nothing(adapter_job_bin, mb_fixtures, tmp_path, flags, message):
    out = tmp_path / "out"
    proc = export(adapter_job_bin, "--hf-model-path", mb_fixtures / "hf_base", "--lora-checkpoint", mb_fixtures / CKPT,
                  "--output", out, "--no-verify", *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("option", ["--out", "--hf-model", "--megatron", "--lora"])
def test_no_prefix_of_an_option_is_taken_for_it(adapter_job_bin, mb_fixtures, tmp_path, option):
    """Boost would have taken --out for --output-hf-path (or --output) and --megatron for
    --megatron-peft-checkpoint; a shortened option is unrecognised."""
    args = {"--hf-model-id": mb_fixtures / "hf_base", "--megatron-peft-checkpoint": mb_fixtures / CKPT,
            "--output-hf-path": tmp_path / "out"}
    replaced = {"--out": "--output-hf-path", "--hf-model": "--hf-model-id", "--megatron": "--megatron-peft-checkpoint",
                "--lora": "--megatron-peft-checkpoint"}[option]
    argv = [a for k, v in args.items() for a in ((option if k == replaced else k), v)]
    proc = run([adapter_job_bin, "export", *argv, "--no-verify"], check=False)
    assert proc.returncode == 2 and f"unrecognised option '{option}'" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_verify_takes_megatron_bridge_spellings(adapter_job_bin, mb_fixtures, ours, tmp_path):
    report = tmp_path / "report.json"
    base = ["--hf-model-path", mb_fixtures / "hf_base", "--hf-adapter-path", ours, "--lora-checkpoint",
            mb_fixtures / CKPT, "--report", report]
    proc = run([adapter_job_bin, "verify", *base, "--cpu", "--tp", "2", "--pp", "2", "--ep", "1"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verdict = json.loads(report.read_text())
    assert verdict["passed"] and verdict["device"] == "cpu"
    proc = run([adapter_job_bin, "verify", *base, "--cpu", "--tp", "1"], check=False)
    assert proc.returncode == 2 and "tensor_model_parallel_size 2" in proc.stderr, proc.stderr
    proc = run([adapter_job_bin, "verify", *base, "--cpu", "--verify-device", "cuda"], check=False)
    assert proc.returncode == 2 and "--cpu and --verify-device cuda disagree" in proc.stderr, proc.stderr


def test_iteration_picks_an_iter_directory_and_a_missing_one_lists_those_there(adapter_job_bin, tmp_path):
    """--iteration N exports save/iter_%07d instead of the one latest_checkpointed_iteration.txt names; one that is
    not there, and a save directory without that marker, are errors listing the iterations found."""
    save = tmp_path / "save"
    first = write_checkpoint(CheckpointConfig(out=save, iteration=100, seed=1))
    write_checkpoint(CheckpointConfig(out=save, iteration=200, seed=2))
    base = build_tiny_llama(TinyLlamaConfig(), tmp_path / "base")
    common = ["--hf-model-id", base, "--no-verify"]

    def exported(out, checkpoint, *extra):
        proc = run([adapter_job_bin, "export", *common, "--megatron-peft-checkpoint", checkpoint,
                    "--output-hf-path", out, *extra], check=False)
        return proc, out / "adapter_model.safetensors"

    _, picked = exported(tmp_path / "picked", save, "--iteration", "100")
    _, direct = exported(tmp_path / "direct", first.iter_dir)
    _, latest = exported(tmp_path / "latest", save)
    assert picked.read_bytes() == direct.read_bytes() != latest.read_bytes()
    proc, _ = exported(tmp_path / "none", save, "--iteration", "300")
    assert proc.returncode == 2 and "iter_0000300' does not exist; it holds iter_0000100, iter_0000200" in proc.stderr
    proc, _ = exported(tmp_path / "inner", first.iter_dir, "--iteration", "200")
    assert proc.returncode == 2 and "is an iteration directory itself" in proc.stderr, proc.stderr
    (save / "latest_checkpointed_iteration.txt").unlink()
    proc, _ = exported(tmp_path / "unmarked", save)
    assert proc.returncode == 2 and "it holds iter_0000100, iter_0000200" in proc.stderr, proc.stderr
