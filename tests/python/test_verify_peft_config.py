"""`adapter_job verify`'s PEFT variant means what stock PEFT 0.21 does with adapter_config.json.

An export of a tiny Llama (4 layers, every linear adapted, fp32) is edited, field by field, and verified without a
checkpoint. Each case holds one of three outcomes, the one stock ``PeftModel.from_pretrained`` dictates:

1. fields modelled (layers_to_transform/layers_pattern, exclude_modules as a list or a regex, target_modules
   "all-linear"): the ``peft`` logits of ``--verify-h5`` equal stock PEFT's on the same directory, and the verdict
   is PEFT's: tensors PEFT ignores fail ``adapter_tensors_all_applied``; a file holding exactly what PEFT loads
   passes. A directory saved by PEFT itself with such fields passes too;
2. fields PEFT applies that verification does not model (modules_to_save, bias, lora_bias, ...): exit 3 with the
   failed check ``adapter_config_modelled`` naming the field, never a pass;
3. what PEFT refuses to load (lora_dropout 2.0, layers_to_transform with a regex target, no module matched, an r or
   a tensor whose shape does not fit, the wrong base model): exit 2 naming the field, or the tensor, its module and
   both shapes; stock PEFT is checked to refuse it too.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import REFERENCE_TOKENS, load_base, logits_of, peft_logits
from tiny_llama import TinyLlamaConfig, build_tiny_llama

torch.set_num_threads(1)

PREFIX = "base_model.model."
REL_TOL = 1e-5          # max |ours - stock PEFT| / max |stock PEFT|, both fp32
MIN_EFFECT = 1e-3       # a modelled field must move PEFT's logits by far more than that, or a test could not fail
EXIT_OK, EXIT_BAD_INPUT, EXIT_FAILED = 0, 2, 3
LAYERS, HIDDEN, RANK = 4, 64, 8
IDS = torch.tensor([REFERENCE_TOKENS])


@dataclass
class Env:
    binary: Path
    base: Path
    export: Path        # the untouched export: every linear of every layer, r 8
    root: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory, adapter_job_bin) -> Env:
    root = tmp_path_factory.mktemp("peft_config")
    base = build_tiny_llama(TinyLlamaConfig(layers=LAYERS, hidden=HIDDEN, dtype="fp32", seed=3), root / "base")
    written = write_checkpoint(CheckpointConfig(out=root / "ckpt", base_model=base, num_layers=LAYERS,
                                                hidden=HIDDEN, dim=RANK, dtype="fp32", seed=3))
    out = root / "export"
    run([adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
         "--output-hf-path", out, "--dtype", "fp32", "--no-verify"], timeout=120, env=dict(os.environ))
    return Env(adapter_job_bin, base, out, root)


def edited(env: Env, dst: Path, config: dict | None = None, keep=lambda name: True, drop_keys=()) -> Path:
    """A copy of the export with `config` merged into adapter_config.json and only the tensors `keep` accepts."""
    dst.mkdir(parents=True)
    cfg = json.loads((env.export / "adapter_config.json").read_text())
    for key in drop_keys:
        cfg.pop(key, None)
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {k: v for k, v in load_file(env.export / "adapter_model.safetensors").items() if keep(k)}
    save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


@dataclass
class Verified:
    rc: int
    stdout: str
    stderr: str
    report: dict | None = None
    peft: np.ndarray | None = None      # [tokens, vocab]

    def check(self, name: str) -> dict:
        return next(c for c in self.report["checks"] if c["name"] == name)

    def failing(self) -> list[str]:
        return [c["name"] for c in self.report["checks"] if not c["passed"]]


def verify(env: Env, adapter: Path, base: Path | None = None) -> Verified:
    report, h5 = adapter.with_suffix(".json"), adapter.with_suffix(".h5")
    proc = run([env.binary, "verify", "--hf-model-id", base or env.base, "--hf-adapter-path", adapter,
                "--verify-device", "cpu", "--prompt-ids", ",".join(map(str, REFERENCE_TOKENS)),
                "--report", report, "--verify-h5", h5], check=False, timeout=120, env=dict(os.environ))
    v = Verified(proc.returncode, proc.stdout, proc.stderr)
    if proc.returncode in (EXIT_OK, EXIT_FAILED):
        v.report = json.loads(report.read_text())
        with h5py.File(h5, "r") as f:
            v.peft = f["prompts/0/logits/peft"][()]
    return v


def rel_err(ours, reference) -> float:
    ours, reference = torch.as_tensor(ours).float(), torch.as_tensor(reference).float()
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def full_peft(env) -> torch.Tensor:
    """Stock PEFT's logits with the whole export applied: a modelled field must differ from these."""
    return peft_logits(env.base, env.export, IDS).logits[0]


def assert_peft_equal(env: Env, v: Verified, adapter: Path, full: torch.Tensor):
    stock = peft_logits(env.base, adapter, IDS)
    effect = rel_err(stock.logits[0], full)
    assert effect > MIN_EFFECT, f"the field barely changes PEFT's logits ({effect:.3g}): the test could not fail"
    err = rel_err(v.peft, stock.logits[0])
    print(f"\n  {adapter.name}: peft variant vs stock PEFT {err:.3g} (field's effect {effect:.3g})")
    assert err < REL_TOL, f"{adapter.name}: peft variant vs stock PEFT relative error {err:.3g}\n{v.stdout}"
    return stock


SHAPE_ERROR = re.compile(r"(\S+) has shape \[([\d, ]*)\] but module (\S+) needs \[([\d, ]*)\]")


def shape_error(stderr: str) -> tuple[str, list[int], str, list[int]]:
    """(tensor, its shape, module, the shape PEFT builds) from verify's message."""
    m = SHAPE_ERROR.search(stderr)
    assert m, f"no 'TENSOR has shape [..] but module M needs [..]' in:\n{stderr}"
    dims = lambda s: [int(d) for d in s.split(", ")]
    return m[1], dims(m[2]), m[3], dims(m[4])


def stock_peft_refuses(env: Env, adapter: Path) -> str:
    from peft import PeftModel
    with pytest.raises(Exception) as caught:
        PeftModel.from_pretrained(load_base(env.base), str(adapter))
    return str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# 1. Fields modelled: the peft variant equals stock PEFT

# name: (config edit, tensors kept) with every tensor PEFT loads present and no other
EXACT = {
    "layers_list": ({"layers_to_transform": [0, 2]}, lambda k: layer_of(k) in (0, 2)),
    "layers_int_pattern": ({"layers_to_transform": 1, "layers_pattern": "layers"}, lambda k: layer_of(k) == 1),
    "exclude_list": ({"exclude_modules": ["v_proj", "down_proj"]},
                     lambda k: ".v_proj." not in k and ".down_proj." not in k),
    "exclude_regex": ({"exclude_modules": r"model\.layers\.[13]\..*"}, lambda k: layer_of(k) in (0, 2)),
    "exact_name_bypasses_layers": (
        {"target_modules": ["q_proj", "model.layers.3.mlp.up_proj"], "layers_to_transform": [0]},
        lambda k: (".q_proj." in k and layer_of(k) == 0) or "layers.3.mlp.up_proj." in k),
    # Python `re` syntax that std::regex (ECMAScript) refused: PEFT's patterns are read with PCRE2 now.
    "regex_target_lookbehind": ({"target_modules": r".*(?<!mlp)\.\w+_proj"}, lambda k: ".mlp." not in k),
    "exclude_regex_inline_flag": ({"exclude_modules": r"(?i)MODEL\.LAYERS\.[13]\..*"},
                                  lambda k: layer_of(k) in (0, 2)),
    "alpha_pattern_lookbehind": ({"alpha_pattern": {r"(?<=mlp\.)down_proj": 64}}, lambda k: True),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_modelled_field_passes_and_equals_stock_peft(env, full_peft, tmp_path, case):
    config, keep = EXACT[case]
    adapter = edited(env, tmp_path / case, config, keep)
    v = verify(env, adapter)
    stock = assert_peft_equal(env, v, adapter, full_peft)
    assert stock.missing == [] and stock.unexpected == [], (stock.missing, stock.unexpected)
    assert v.rc == EXIT_OK and v.failing() == [], f"exit {v.rc}\n{v.stdout}\n{v.stderr}"


def verify_passes_as_stock_peft(env, adapter):
    """Our verification passes, and its peft logits are stock PEFT's, which loads every tensor."""
    v = verify(env, adapter)
    stock = peft_logits(env.base, adapter, IDS)
    assert stock.missing == [] and stock.unexpected == []
    err = rel_err(v.peft, stock.logits[0])
    assert err < REL_TOL, f"peft variant vs stock PEFT relative error {err:.3g}\n{v.stdout}"
    assert v.rc == EXIT_OK and v.failing() == [], f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    return v


def test_all_linear_equals_stock_peft(env, tmp_path):
    adapter = edited(env, tmp_path / "all_linear", {"target_modules": "all-linear"})
    verify_passes_as_stock_peft(env, adapter)


@pytest.mark.parametrize("config", [{"layers_to_transform": [0]}, {"exclude_modules": ["o_proj"]}],
                         ids=["layers_to_transform", "exclude_modules"])
def test_tensors_peft_ignores_fail_the_check_and_logits_still_equal_stock_peft(env, full_peft, tmp_path, config):
    """The file keeps every tensor; PEFT loads only the ones the field leaves, and so does the peft variant."""
    adapter = edited(env, tmp_path / next(iter(config)), config)
    v = verify(env, adapter)
    stock = assert_peft_equal(env, v, adapter, full_peft)
    assert stock.unexpected, "stock PEFT should ignore some of the tensors"
    assert v.rc == EXIT_FAILED and v.failing() == ["adapter_tensors_all_applied"], v.stdout
    assert PREFIX in v.check("adapter_tensors_all_applied")["detail"]


def test_adapter_saved_by_peft_with_layers_and_excludes_passes(env, tmp_path):
    """PEFT's own save_pretrained writes every LoraConfig field: none may trip the verifier, and the rest match."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                        exclude_modules=["model.layers.2.mlp.gate_proj"], layers_to_transform=[1, 2],
                        layers_pattern="layers", rank_pattern={"down_proj": 2}, use_rslora=True,
                        init_lora_weights=False)
    model = get_peft_model(load_base(env.base), config)
    adapter = tmp_path / "peft_saved"
    model.save_pretrained(str(adapter))
    v = verify_passes_as_stock_peft(env, adapter)
    assert v.check("adapter_config_modelled")["passed"]


# ---------------------------------------------------------------------------------------------------------------
# 2. Fields PEFT applies that are not modelled: the verdict fails, naming the field

UNMODELLED = {
    "modules_to_save": ["lm_head"],        # with the saved lm_head in the file, as PEFT requires
    "bias": "lora_only",
    "lora_bias": True,
    "layer_replication": [[0, 4], [2, 4]],
    "init_lora_weights": "pissa",          # PEFT rewrites the base weights while loading
    "alora_invocation_tokens": [1, 2],
}


@pytest.mark.parametrize("field", list(UNMODELLED))
def test_unmodelled_field_fails_the_verdict_naming_it(env, tmp_path, field):
    adapter = edited(env, tmp_path / field, {field: UNMODELLED[field]})
    if field == "modules_to_save":
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors[PREFIX + "lm_head.weight"] = load_file(env.base / "model.safetensors")["lm_head.weight"] * 1.5
        save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    stock = peft_logits(env.base, adapter, IDS)  # PEFT loads it: not a bad input but math unmodelled here
    v = verify(env, adapter)
    assert v.rc == EXIT_FAILED, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    assert "adapter_config_modelled" in v.failing(), v.stdout
    check = v.check("adapter_config_modelled")
    assert check["figure"] == 1 and f"{field}: " in check["detail"], check
    assert "verification PASSED" not in v.stdout
    print(f"\n  {field}: peft variant vs stock PEFT {rel_err(v.peft, stock.logits[0]):.3g}")


def test_null_target_modules_is_not_modelled(env, tmp_path):
    """PEFT fills in its own per-architecture default then; the verdict must not pass on another set."""
    adapter = edited(env, tmp_path / "no_targets", drop_keys=("target_modules",))
    v = verify(env, adapter)
    assert v.rc == EXIT_FAILED, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    assert "target_modules" in v.check("adapter_config_modelled")["detail"]


# ---------------------------------------------------------------------------------------------------------------
# 3. What stock PEFT refuses to load: exit 2, naming the field or the tensor

REFUSED = {
    "lora_dropout": ({"lora_dropout": 2.0}, "lora_dropout"),
    "layers_with_regex_target": ({"target_modules": r".*\.q_proj", "layers_to_transform": [0]},
                                 "layers_to_transform"),
    "nothing_targeted": ({"target_modules": ["qkv_proj"]}, "target_modules"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_config_peft_refuses_exits_2_naming_the_field(env, tmp_path, case):
    config, field = REFUSED[case]
    adapter = edited(env, tmp_path / case, config)
    stock_peft_refuses(env, adapter)
    v = verify(env, adapter)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    assert field in v.stderr and "adapter_config.json" in v.stderr, v.stderr


def test_r_contradicting_the_tensors_exits_2(env, tmp_path):
    """No checkpoint to compare with: r 4 against rank-8 tensors would only rescale; PEFT refuses the sizes."""
    adapter = edited(env, tmp_path / "r4", {"r": 4})
    assert "size mismatch" in stock_peft_refuses(env, adapter)
    v = verify(env, adapter)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    tensor, found, module, expected = shape_error(v.stderr)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert list(tensors[tensor].shape) == found and tensor.startswith(PREFIX + module + ".lora_"), v.stderr
    assert RANK in found and 4 in expected and RANK not in expected, v.stderr
    assert "adapter_model.safetensors" in v.stderr and "Traceback" not in v.stderr


def test_wrong_shape_lora_a_exits_2_naming_tensor_module_and_shapes(env, tmp_path):
    adapter = edited(env, tmp_path / "bad_a")
    name = PREFIX + "model.layers.2.self_attn.o_proj.lora_A.weight"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors[name].shape == (RANK, HIDDEN)
    tensors[name] = tensors[name][:, : HIDDEN - 1].contiguous()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    assert "size mismatch" in stock_peft_refuses(env, adapter)
    v = verify(env, adapter)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    assert shape_error(v.stderr) == (name, [RANK, HIDDEN - 1], "model.layers.2.self_attn.o_proj", [RANK, HIDDEN])
    assert "c10::" not in v.stderr


def test_wrong_base_model_exits_2_naming_module_and_shapes(env, tmp_path):
    """The same adapter against a base of another width: PEFT refuses it, verification must not crash."""
    wide = 96
    other = build_tiny_llama(TinyLlamaConfig(layers=LAYERS, hidden=wide, heads=4, kv_heads=2, head_dim=24,
                                             dtype="fp32", seed=4), tmp_path / "other_base")
    from peft import PeftModel
    with pytest.raises(Exception, match="size mismatch"):
        PeftModel.from_pretrained(load_base(other), str(env.export))
    v = verify(env, env.export, base=other)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    tensor, found, module, expected = shape_error(v.stderr)
    assert list(load_file(env.export / "adapter_model.safetensors")[tensor].shape) == found
    weight = load_file(other / "model.safetensors")[module + ".weight"]
    kind = tensor.rsplit(".", 2)[-2]
    assert expected == ([RANK, weight.shape[1]] if kind == "lora_A" else [weight.shape[0], RANK]), v.stderr
    assert HIDDEN in found and wide in expected, v.stderr


def test_rank_pattern_contradicting_the_tensors_exits_2(env, tmp_path):
    adapter = edited(env, tmp_path / "rank_pattern", {"rank_pattern": {"q_proj": 4}})
    assert "size mismatch" in stock_peft_refuses(env, adapter)
    v = verify(env, adapter)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    tensor, found, module, expected = shape_error(v.stderr)
    assert module.endswith(".self_attn.q_proj") and RANK in found and 4 in expected, v.stderr


def test_wrong_shape_dora_magnitude_exits_2(env, tmp_path):
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", base_model=env.base, kind="dora",
                                                num_layers=LAYERS, hidden=HIDDEN, dim=RANK, dtype="fp32", seed=5))
    adapter = tmp_path / "dora"
    run([env.binary, "export", "--hf-model-id", env.base, "--megatron-peft-checkpoint", written.root,
         "--output-hf-path", adapter, "--dtype", "fp32", "--no-verify"], timeout=120, env=dict(os.environ))
    tensors = load_file(adapter / "adapter_model.safetensors")
    name = PREFIX + "model.layers.1.mlp.up_proj.lora_magnitude_vector"
    out = tensors[name].shape[0]
    tensors[name] = tensors[name][: out - 1].contiguous()
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    assert "size mismatch" in stock_peft_refuses(env, adapter)
    v = verify(env, adapter)
    assert v.rc == EXIT_BAD_INPUT, f"exit {v.rc}\n{v.stdout}\n{v.stderr}"
    assert shape_error(v.stderr) == (name, [out - 1], "model.layers.1.mlp.up_proj", [out])
