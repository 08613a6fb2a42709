"""Malformed settings are errors (exit 2), never defaults: every run_config.yaml value the export reads is type- and
range-checked, and the message names the file, the key path, the value and what was expected. Also: config.json
values that contradict each other or the checkpoint, base-model safetensors shapes that contradict config.json,
stray command-line arguments, `--config` naming a directory, an iteration number past int64 in the hook, and an
unknown ADAPTER_JOB_LAUNCH in the Slurm script.

Each case starts from a generated checkpoint (tests/fixtures/megatron_checkpoint.py) and a tiny Llama, copied to a
temporary directory and edited there."""
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from tiny_llama import TinyLlamaConfig, build_tiny_llama

PLACEHOLDER = "__adapter_job_test_value__"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A tiny Llama, a TP1 LoRA checkpoint of it, a Qwen3-MoE with 4 experts and an MoE checkpoint of it in the
    pre-0.5.1 shared layout (no expert axis: nothing in the tensors says how many experts there are)."""
    root = tmp_path_factory.mktemp("generated")
    base = build_tiny_llama(TinyLlamaConfig(), root / "base")
    ckpt = write_checkpoint(CheckpointConfig(out=root / "ckpt")).root
    moe = TinyLlamaConfig(architecture="qwen3_moe", head_dim=32)
    moe_base = build_tiny_llama(moe, root / "moe_base")
    moe_ckpt = write_checkpoint(CheckpointConfig(
        out=root / "moe_ckpt", heads=moe.heads, query_groups=moe.kv_heads, head_dim=moe.head_dim, hidden=moe.hidden,
        ffn=moe.ffn, num_layers=moe.layers, experts=moe.experts, expert_ffn=moe.expert_ffn,
        topk=moe.experts_per_token, legacy_shared_experts=True)).root
    return {"base": base, "ckpt": ckpt, "moe_base": moe_base, "moe_ckpt": moe_ckpt}


@pytest.fixture
def ckpt(generated, tmp_path):
    return Path(shutil.copytree(generated["ckpt"], tmp_path / "ckpt"))


@pytest.fixture
def base(generated, tmp_path):
    return Path(shutil.copytree(generated["base"], tmp_path / "base"))


def export(binary, hf, ckpt, out, *extra):
    return run([binary, "export", "--hf-model-id", hf, "--megatron-peft-checkpoint", ckpt, "--output-hf-path", out,
                "--verify-device", "cpu", *extra], check=False, timeout=300)


def expect_bad_input(proc, out: Path, *fragments) -> str:
    """Exit 2 and one error line that names every fragment; nothing published."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    assert "internal error" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0], f"missing {fragment!r} in: {errors[0]}"
    assert not out.exists() and not Path(f"{out}.unverified").exists()
    return errors[0]


def set_run_config(ckpt: Path, section: str, key: str, raw: str | None) -> Path:
    """Sets run_config.yaml's `section.key` to the YAML text `raw` as written (None: removes the whole section and
    writes `section: <raw section>` instead when key is empty)."""
    path = next(ckpt.glob("iter_*")) / "run_config.yaml"
    settings = yaml.safe_load(path.read_text())
    if key:
        settings[section][key] = PLACEHOLDER
    else:
        settings[section] = PLACEHOLDER
    path.write_text(yaml.safe_dump(settings, sort_keys=True).replace(PLACEHOLDER, raw))
    return path


# (section, key, the value as YAML text, what the message must say was expected)
RUN_CONFIG_CASES = [
    # alpha as a map, list or null became 32 (and verified: the merged variant used the same wrong alpha)
    ("peft", "alpha", "{scale: 16}", "a finite number > 0"),
    ("peft", "alpha", "[16]", "a finite number > 0"),
    ("peft", "alpha", "null", "a finite number > 0"),
    ("peft", "alpha", "~", "a finite number > 0"),
    ("peft", "alpha", "nan", "a finite number > 0"),      # was written to adapter_config.json as null
    ("peft", "alpha", ".nan", "a finite number > 0"),
    ("peft", "alpha", ".inf", "a finite number > 0"),
    ("peft", "alpha", "0", "a finite number > 0"),
    ("peft", "alpha", "-16", "a finite number > 0"),
    ("peft", "alpha", "'16'", "a finite number > 0"),
    ("peft", "alpha", "true", "a finite number > 0"),
    ("peft", "dropout", "2.0", "a number >= 0 and < 1"),  # was published as lora_dropout 2.0
    ("peft", "dropout", "1", "a number >= 0 and < 1"),
    ("peft", "dropout", "-0.1", "a number >= 0 and < 1"),
    ("peft", "dropout", "{p: 0.1}", "a number >= 0 and < 1"),
    ("peft", "dropout", "null", "a number >= 0 and < 1"),
    ("peft", "dim", "8.5", "an integer from 1 to"),
    ("peft", "dim", "'8'", "an integer from 1 to"),
    ("peft", "dim", "true", "an integer from 1 to"),
    ("peft", "dim", "null", "an integer from 1 to"),
    ("peft", "dim", "99999999999999999999", "an integer from 1 to"),
    ("peft", "dropout_position", "middle", "pre or post"),
    ("peft", "target_modules", "linear_qkv", "a list of strings"),
    ("peft", "target_modules", "[[linear_qkv]]", "a list of strings"),  # a YAML bad conversion: exit 1
    ("peft", "target_modules", "[linear_qkv, {a: 1}]", "a list of strings"),
    ("peft", "exclude_modules", "[null]", "a list of strings"),
    ("peft", "share_expert_adapters", "'yes'", "true or false"),
    ("peft", "share_expert_adapters", "1", "true or false"),
    ("peft", "normalize_moe_lora", "null", "true or false"),
    ("peft", "_target_", "[megatron.bridge.peft.lora.LoRA]", "a string"),
    ("model", "pipeline_model_parallel_size", "4294967296", "an integer from 1 to 65536"),  # was SIGFPE
    ("model", "pipeline_model_parallel_size", "4294967297", "an integer from 1 to 65536"),  # was read as 1
    ("model", "tensor_model_parallel_size", "100000", "an integer from 1 to 65536"),
    ("model", "tensor_model_parallel_size", "1.5", "an integer from 1 to 65536"),
    ("model", "tensor_model_parallel_size", "null", "an integer from 1 to 65536"),
    ("model", "virtual_pipeline_model_parallel_size", "'2'", "an integer from 1 to 65536"),
    ("model", "expert_tensor_parallel_size", "[1]", "an integer from 1 to 65536"),
    ("model", "num_layers", "four", "an integer from 1 to"),
    ("model", "hidden_size", "{a: 1}", "an integer from 1 to"),
    ("model", "num_query_groups", "0", "an integer from 1 to"),
    ("model", "num_moe_experts", "-4", "an integer from 1 to"),
    ("model", "bf16", "'true'", "true or false"),
    ("model", "fp16", "null", "true or false"),
    ("model", "hf_model_id", "[a, b]", "a string"),
    ("model", "params_dtype", "torch.bfloat16", "a mapping"),
    ("model", "extra_checkpoint_metadata", "[1]", "a mapping"),
]


@pytest.mark.parametrize("section,key,raw,expected", RUN_CONFIG_CASES,
                         ids=[f"{s}.{k}={r}" for s, k, r, _ in RUN_CONFIG_CASES])
def test_malformed_run_config_value(adapter_job_bin, generated, ckpt, tmp_path, section, key, raw, expected):
    path = set_run_config(ckpt, section, key, raw)
    out = tmp_path / "adapter"
    value = "null" if raw in ("~", "null") else raw
    expect_bad_input(export(adapter_job_bin, generated["base"], ckpt, out), out, path, f"{section}.{key} is {value};",
                     f"expected {expected}")


@pytest.mark.parametrize("section,raw", [("peft", "5"), ("peft", "[dim, alpha]"), ("model", "gpt")])
def test_section_that_is_not_a_mapping(adapter_job_bin, generated, ckpt, tmp_path, section, raw):
    path = set_run_config(ckpt, section, "", raw)
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, generated["base"], ckpt, out), out, path, f"{section} is {raw};",
                     "expected a mapping")


def test_alpha_and_dropout_keep_their_types(adapter_job_bin, generated, ckpt, tmp_path):
    """The checks do not change what valid values become: an int alpha stays an int, a float dropout a float."""
    set_run_config(ckpt, "peft", "alpha", "24")
    set_run_config(ckpt, "peft", "dropout", "0.05")
    out = tmp_path / "adapter"
    run([adapter_job_bin, "export", "--hf-model-id", generated["base"], "--megatron-peft-checkpoint", ckpt,
         "--output-hf-path", out, "--no-verify"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 24 and isinstance(config["lora_alpha"], int)
    assert config["lora_dropout"] == 0.05


def test_training_shards_beyond_the_bound(adapter_job_bin, generated, ckpt, tmp_path):
    """Each size is sane, but PP x max(TP, EP x expert TP) is past what any run has (and what int holds)."""
    set_run_config(ckpt, "model", "pipeline_model_parallel_size", "65536")
    path = set_run_config(ckpt, "model", "tensor_model_parallel_size", "65536")
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, generated["base"], ckpt, out), out, path,
                     "model.pipeline_model_parallel_size 65536 x max(tensor_model_parallel_size 65536",
                     "training shards; expected at most 1048576")


# ---------------------------------------------------------------------------------------------------------------
# config.json

def edit_config(model: Path, **changes) -> Path:
    path = model / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    return path


def test_num_experts_that_contradicts_num_local_experts(adapter_job_bin, generated, tmp_path):
    """config.json says num_local_experts 4 (the model has 4) and num_experts 8: which one is meant is unknowable."""
    model = Path(shutil.copytree(generated["moe_base"], tmp_path / "moe"))
    path = edit_config(model, num_experts=8)
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, model, generated["moe_ckpt"], out), out, path, "num_experts 8",
                     "num_local_experts 4")


def test_num_experts_that_contradicts_the_checkpoint(adapter_job_bin, generated, tmp_path):
    """An 8-expert config.json against a 4-expert checkpoint whose shared adapters carry no expert axis: only
    run_config.yaml's model.num_moe_experts says 4, and the export must not copy the adapter to 8 experts."""
    model = Path(shutil.copytree(generated["moe_base"], tmp_path / "moe"))
    path = edit_config(model, num_local_experts=None, num_experts=8)
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, model, generated["moe_ckpt"], out, "--no-verify"), out, path,
                     "8 experts", "run_config.yaml", "model.num_moe_experts is 4")


def test_architecture_not_supported_even_when_model_type_is(adapter_job_bin, generated, base, ckpt, tmp_path):
    path = edit_config(base, architectures=["EvilForCausalLM"], model_type="llama")
    out = tmp_path / "adapter"
    error = expect_bad_input(export(adapter_job_bin, base, ckpt, out), out, path, "'EvilForCausalLM'",
                             "LlamaForCausalLM")
    assert "is not supported" in error


@pytest.mark.parametrize("changes,key", [
    ({"rope_theta": "500000"}, "rope_theta"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e6"}}, "rope_parameters.rope_theta"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": [10000]}}, "rope_parameters.rope_theta"),
])
def test_malformed_numbers_in_config_json(adapter_job_bin, generated, base, ckpt, tmp_path, changes, key):
    """A string where RoPE's theta or the norm epsilon belongs was ignored (the defaults were used, in the verifying
    forward pass too)."""
    path = edit_config(base, **changes)
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, base, ckpt, out), out, path, f"'{key}'", "expected a number > 0")


def rewrite_header_shape(model: Path, name: str, shape: list[int]) -> Path:
    """model.safetensors with `name`'s header shape replaced by one of the same byte count: a file the reader
    accepts (offsets and sizes agree) whose shape lies."""
    path = model / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert header[name]["shape"] != shape
    header[name]["shape"] = shape
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return path


@pytest.mark.parametrize("name,shape,expected", [
    ("model.layers.0.self_attn.q_proj.weight", [32, 128], "[64, 64]"),   # was a libtorch error: exit 1
    ("model.embed_tokens.weight", [128, 128], "[256, 64]"),
    ("lm_head.weight", [64, 256], "[256, 64]"),
    ("model.layers.1.input_layernorm.weight", [8, 8], "[64]"),
    ("model.norm.weight", [1, 64], "[64]"),                              # broadcast: was exit 0
])
def test_base_model_shape_that_contradicts_config_json(adapter_job_bin, generated, base, ckpt, tmp_path, name, shape,
                                                       expected):
    path = rewrite_header_shape(base, name, shape)
    out = tmp_path / "adapter"
    expect_bad_input(export(adapter_job_bin, base, ckpt, out), out, path, f"'{name}' has shape {shape}",
                     f"{base / 'config.json'} implies {expected}")


# ---------------------------------------------------------------------------------------------------------------
# the command line, the hook, the Slurm script

def test_stray_positional_arguments(adapter_job_bin, generated, tmp_path):
    out = tmp_path / "adapter"
    common = ["--hf-model-id", generated["base"], "--megatron-peft-checkpoint", generated["ckpt"],
              "--output-hf-path", out, "--no-verify"]
    for args in (["export", "leftover", *common], ["export", *common, "leftover", "more"], [*common, "leftover"],
                 ["stream", *common[:4], "--output", tmp_path / "x.safetensors", "leftover"],
                 ["verify", "--hf-model-id", generated["base"], "--hf-adapter-path", tmp_path / "none", "leftover"],
                 ["version", "leftover"]):
        proc = run([adapter_job_bin, *args], check=False)
        assert proc.returncode == 2, (args, proc.returncode, proc.stdout, proc.stderr)
        assert "unexpected argument 'leftover'" in proc.stderr, (args, proc.stderr)
        assert not out.exists() and not (tmp_path / "x.safetensors").exists()


def test_config_that_is_a_directory(adapter_job_bin, generated, tmp_path):
    out = tmp_path / "adapter"
    directory = tmp_path / "settings.ini"
    directory.mkdir()
    proc = run([adapter_job_bin, "export", "--config", directory, "--hf-model-id", generated["base"],
                "--megatron-peft-checkpoint", generated["ckpt"], "--output-hf-path", out, "--no-verify"], check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert f"config file '{directory}' is a directory" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("iteration", ["9223372036854775808", "18446744073709551617", "99999999999999999999999"])
def test_hook_iteration_past_int64(adapter_job_bin, generated, ckpt, tmp_path, iteration):
    """bash arithmetic wrapped these (9223372036854775808 named iter_-9223372036854775808), and the hook then
    waited for a directory that cannot exist."""
    (ckpt / "latest_checkpointed_iteration.txt").write_text(iteration + "\n")
    out = tmp_path / "adapter"
    env = {"ADAPTER_JOB_CHECKPOINT": str(ckpt), "ADAPTER_JOB_HF_MODEL": str(generated["base"]),
           "ADAPTER_JOB_OUTPUT": str(out), "ADAPTER_JOB_BIN": str(adapter_job_bin),
           "ADAPTER_JOB_WAIT_SECONDS": "2", "ADAPTER_JOB_POLL_SECONDS": "1"}
    proc = subprocess.run(["bash", REPO / "jobs" / "export_hook.sh"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    result = json.loads(Path(f"{out}.result.json").read_text())
    assert result["exit_code"] == 2 and iteration in result["message"], result
    assert "iter_-" not in result["message"] and not out.exists()


def test_slurm_script_refuses_an_unknown_launcher(adapter_job_bin, generated, tmp_path):
    """ADAPTER_JOB_LAUNCH=srunn (a typo) fell back to mpirun; it is refused before anything starts."""
    out = tmp_path / "adapter"
    env = {"ADAPTER_JOB_LAUNCH": "srunn", "ADAPTER_JOB_BIN": str(adapter_job_bin),
           "ADAPTER_JOB_ARGS": "--no-verify", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = subprocess.run(["bash", REPO / "slurm" / "export.sbatch", "--hf-model-id", generated["base"],
                           "--megatron-peft-checkpoint", generated["ckpt"], "--output-hf-path", out],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env}, cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "ADAPTER_JOB_LAUNCH 'srunn'" in proc.stderr and "srun or mpirun" in proc.stderr, proc.stderr
    assert not out.exists()
