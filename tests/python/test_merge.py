"""`adapter_job merge`, held to stock transformers and PEFT:

1. the merged directory loads in stock ``AutoModelForCausalLM.from_pretrained`` with no warning, and its fp32 logits
   equal stock ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` and the fp32 merge of the checkpoint's
   live tensors (peft_reference.py), for LoRA (TP2, fp32 base), DoRA (PP2, tied embeddings, bf16 base merged with
   --dtype fp32) and CanonicalLoRA (TP2);
2. a merge in the base's bf16 is the fp32 merge rounded once: every merged element within one bf16 step of the
   reference rounded to bf16, almost all equal; untargeted tensors byte for byte; config.json, generation_config.json
   and the tokenizer files as the base's;
3. small --max-shard-size: save_pretrained's shard names and a valid index; -np 1, 2 and 4 write the same bytes;
4. Megatron-Bridge's real TP2xPP2 checkpoint: equal to PEFT's merge of Megatron-Bridge's own export;
5. bad input (a base lacking a targeted tensor, a base whose tensor has the wrong shape, an existing output) exits 2
   naming the file and key, and leaves nothing behind;
6. four faults planted in a correct merge (DoRA norm dropped, update rounded to bf16 before adding, a layer not
   merged, a tensor never written) fail `verify --merged-model`;
7. every family the export supports: Qwen2, Qwen3, Mistral, Gemma 1-3 against PEFT's merge_and_unload, Qwen3-MoE
   and Mixtral experts (per-expert, shared, normalize_moe_lora) against the fp32 merge of the checkpoint.
"""
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import live_tensors, load_base, logits_of, merged_reference_logits, tokens
from tiny_llama import TinyLlamaConfig, build_tiny_llama

torch.set_num_threads(1)

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
REL_TOL = 1e-5     # max |ours - reference| / max |reference|, both fp32
MIN_EFFECT = 1e-2  # the adapter must move the logits far more than the tolerance, or the test could not fail
EXIT_BAD_INPUT = 2

# name: (base, CheckpointConfig fields, merge --dtype)
CASES = {
    "lora_tp2_fp32": (TinyLlamaConfig(dtype="fp32", seed=3), dict(kind="lora", tp=2, pp=1, dtype="fp32"), "auto"),
    "dora_pp2_tied": (TinyLlamaConfig(tie_word_embeddings=True, seed=1), dict(kind="dora", tp=1, pp=2), "fp32"),
    "canonical_tp2": (TinyLlamaConfig(dtype="fp32", seed=2), dict(kind="canonical_lora", tp=2, pp=1), "auto"),
}


def adapter_job(binary, command, *args, np=None, check=True):
    launcher = [] if np is None else [*MPIRUN, "-np", str(np)]
    return run([*launcher, binary, command, *args], check=check, timeout=300, env=dict(os.environ))


def rel_err(ours, reference) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


class Case:
    def __init__(self, root: Path, binary: Path, name: str):
        base_cfg, fields, self.dtype = CASES[name]
        self.base = build_tiny_llama(base_cfg, root / "base")
        self.cfg = CheckpointConfig(out=root / "ckpt", base_model=self.base, **fields)
        self.written = write_checkpoint(self.cfg)
        self.adapter = root / "adapter"
        adapter_job(binary, "export", "--hf-model-id", self.base, "--megatron-peft-checkpoint", self.written.root,
                    "--output-hf-path", self.adapter, "--no-verify")
        self.binary, self.root = binary, root

    def merge(self, out: Path, *extra, np=None, check=True):
        return adapter_job(self.binary, "merge", "--hf-model-id", self.base, "--megatron-peft-checkpoint",
                           self.written.root, "--output-hf-path", out, "--verify-device", "cpu", *extra, np=np,
                           check=check)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, adapter_job_bin):
    made = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(tmp_path_factory.mktemp(name), adapter_job_bin, name)
        return made[name]
    return get


class TransformersMessages(logging.Handler):
    """Every transformers log record at warning level and above."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(f"{record.levelname}: {record.getMessage()}")


def load_merged(path: Path):
    """Stock transformers on our output, fp32; fails on any warning it raises or logs."""
    from transformers import AutoModelForCausalLM
    handler = TransformersMessages()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                               attn_implementation="eager", output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), f"{path} loaded with {info}"
    messages = [f"{w.category.__name__}: {w.message}" for w in caught] + handler.records
    assert messages == [], f"loading {path} warned: {messages}"
    return model.eval()


def peft_merged_model(base: Path, adapter: Path):
    """Stock PEFT's merge of `adapter` into `base`, in fp32."""
    from peft import PeftModel
    return PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload().eval()


@pytest.mark.parametrize("name", sorted(CASES))
def test_merged_model_equals_peft_merge_and_unload(cases, name, tmp_path):
    case = cases(name)
    out = tmp_path / "merged"
    case.merge(out, "--dtype", case.dtype)
    ids = tokens(256, 16)
    ours = logits_of(load_merged(out), ids)
    peft = logits_of(peft_merged_model(case.base, case.adapter), ids)
    cfg = case.cfg
    reference = merged_reference_logits(case.base, live_tensors(case.written), cfg.kind, cfg.alpha, cfg.dim, ids)
    base = logits_of(load_base(case.base), ids)
    assert rel_err(peft, base) > MIN_EFFECT, "the adapter hardly moves the logits: this test could not fail"
    assert rel_err(ours, peft) < REL_TOL, "merged model != PEFT merge_and_unload"
    assert rel_err(ours, reference) < REL_TOL, "merged model != fp32 merge of the checkpoint's tensors"


def test_bf16_merge_is_the_fp32_merge_rounded_once(cases, tmp_path):
    case = cases("dora_pp2_tied")  # a bf16 base
    out = tmp_path / "merged"
    case.merge(out)  # --dtype auto: the base's bf16
    reference = peft_merged_model(case.base, case.adapter).state_dict()
    base = load_file(str(case.base / "model.safetensors"))
    ours = load_file(str(out / "model.safetensors"))
    assert set(ours) == set(base), "the merged model has the base's tensors, no more (tied lm_head stays tied)"
    merged = 0
    for name, tensor in ours.items():
        assert tensor.dtype == base[name].dtype == torch.bfloat16
        if torch.equal(base[name], reference[name].to(torch.bfloat16)):
            assert torch.equal(tensor.view(torch.int16), base[name].view(torch.int16)), f"{name} changed"
            continue
        merged += 1
        expected = reference[name].to(torch.bfloat16)
        steps = (tensor.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
        assert steps.max().item() <= 1, f"{name}: {steps.max().item()} bf16 steps from the fp32 merge"
        assert (steps != 0).float().mean().item() < 1e-3, f"{name}: many elements rounded differently"
    assert merged == 4 * 7, "every targeted projection of the 4 layers was merged"
    for name in ["config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (case.base / name).read_bytes()


def test_sharded_output_and_any_rank_count_write_the_same_bytes(cases, tmp_path):
    case = cases("lora_tp2_fp32")
    outputs = {}
    for np in (None, 2, 4):
        out = tmp_path / f"np{np or 1}"
        case.merge(out, "--max-shard-size", "40KB", "--no-verify", np=np)
        outputs[np or 1] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    files = sorted(outputs[1])
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    for np in (2, 4):
        assert sorted(outputs[np]) == files
        for f in files:
            assert outputs[np][f] == outputs[1][f], f"-np {np} wrote {f} differently"
    index = json.loads(outputs[1]["model.safetensors.index.json"])
    on_disk = {}
    for shard in shards:
        with safe_open(str(tmp_path / "np1" / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            on_disk |= {name: shard for name in f.keys()}
    assert index["weight_map"] == on_disk
    # The split is huggingface_hub's (what save_pretrained calls), given our save order: names with their numbers
    # compared as numbers, so each layer stays together and the layers go in order.
    from huggingface_hub import split_torch_state_dict_into_shards
    tensors = {}
    for shard in shards:
        tensors |= load_file(str(tmp_path / "np1" / shard))
    natural = sorted(tensors, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    split = split_torch_state_dict_into_shards({n: tensors[n] for n in natural}, max_shard_size="40KB",
                                               filename_pattern="model{suffix}.safetensors")
    assert {f: sorted(names) for f, names in split.filename_to_tensors.items()} == \
        {f: sorted(n for n, s in on_disk.items() if s == f) for f in shards}
    total = sum(t.numel() * t.element_size() for s in shards for t in load_file(str(tmp_path / "np1" / s)).values())
    assert index["metadata"]["total_size"] == total
    ids = tokens(256, 16)
    assert rel_err(logits_of(load_merged(tmp_path / "np1"), ids),
                   logits_of(peft_merged_model(case.base, case.adapter), ids)) < REL_TOL


def test_merge_device_choice(cases, tmp_path):
    """--merge-device: the report names where each rank merged; cuda without a GPU (or without the CUDA kernels) is
    exit 2 on every rank before anything is written; a bad value is exit 2. (The GPU against the CPU: test_gpu.py.)"""
    case = cases("lora_tp2_fp32")
    report = tmp_path / "report.json"
    case.merge(tmp_path / "cpu", "--merge-device", "cpu", "--no-verify", "--report", report, np=2)
    per_rank = json.loads(report.read_text())["output_per_rank"]
    assert per_rank["device"] == ["cpu", "cpu"] and all(n > 0 for n in per_rank["bytes_written"])
    assert per_rank["gpu_bytes"] == [0, 0]
    if not torch.cuda.is_available():
        proc = case.merge(tmp_path / "cuda", "--merge-device", "cuda", np=2, check=False)
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
        assert re.search(r"--merge-device cuda: (rank 0 on .* sees no GPU|this adapter_job was built without)",
                         proc.stderr), proc.stderr
        assert not (tmp_path / "cuda").exists() and not list(tmp_path.glob(".cuda*"))
    bad = case.merge(tmp_path / "bad", "--merge-device", "gpu", check=False)
    assert bad.returncode == EXIT_BAD_INPUT and "--merge-device must be auto, cpu or cuda, not 'gpu'" in bad.stderr


def test_real_megatron_bridge_checkpoint(mb_fixtures, adapter_job_bin, tmp_path):
    out = tmp_path / "merged"
    adapter_job(adapter_job_bin, "merge", "--hf-model-id", mb_fixtures / "hf_base", "--megatron-peft-checkpoint",
                mb_fixtures / "tp2pp2" / "lora" / "megatron_ckpt", "--output-hf-path", out, "--dtype", "fp32",
                "--verify-device", "cpu", np=4)
    ids = tokens(256, 16)
    peft = peft_merged_model(mb_fixtures / "hf_base", mb_fixtures / "tp2pp2" / "lora" / "mb_export_adapter")
    assert rel_err(logits_of(load_merged(out), ids), logits_of(peft, ids)) < REL_TOL
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (mb_fixtures / "hf_base" / name).read_bytes()


def base_copy(case: Case, tmp_path: Path, edit) -> Path:
    base = tmp_path / "base"
    shutil.copytree(case.base, base)
    tensors = load_file(str(base / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("fault", ["missing", "shape"])
def test_a_base_that_does_not_fit_the_adapter_is_refused(cases, tmp_path, fault):
    case = cases("lora_tp2_fp32")
    key = "model.layers.1.self_attn.k_proj.weight"

    def edit(tensors):
        if fault == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key][:, :-2].contiguous()
    base = base_copy(case, tmp_path, edit)
    out = tmp_path / "out" / "merged"
    proc = adapter_job(case.binary, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint", case.written.root,
                       "--output-hf-path", out, "--no-verify", check=False)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert key.removesuffix(".weight") in proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == [], "partial output left"


def test_an_existing_output_is_kept_without_overwrite(cases, tmp_path):
    case = cases("lora_tp2_fp32")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = case.merge(out, "--no-verify", check=False)
    assert proc.returncode == EXIT_BAD_INPUT and "--overwrite" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and (out / "config.json").read_text() == "{}"
    case.merge(out, "--no-verify", "--overwrite")
    load_merged(out)
    # An earlier merge in another number of shards is replaced too, and nothing of it is left.
    case.merge(out, "--no-verify", "--overwrite", "--max-shard-size", "40KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    case.merge(out, "--no-verify", "--overwrite", "--max-shard-size", "60KB")
    assert sorted(p.name for p in out.glob("model-*.safetensors")) != shards
    load_merged(out)
    # What this tool never writes is never replaced.
    (out / "notes.txt").write_text("mine")
    proc = case.merge(out, "--no-verify", "--overwrite", check=False)
    assert proc.returncode == EXIT_BAD_INPUT and "notes.txt" in proc.stderr
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------------------
# Verification of the merged files: faults planted in a correct merge must fail it (exit 3)

EXIT_FAILED = 3


def planted(case: Case, good: Path, out: Path, fault: str) -> Path:
    """A copy of the correct fp32 merge `good` with one fault, computed from the base and the adapter."""
    shutil.copytree(good, out)
    base = {k: v.float() for k, v in load_file(str(case.base / "model.safetensors")).items()}
    merged = load_file(str(out / "model.safetensors"))
    adapter = load_file(str(case.adapter / "adapter_model.safetensors"))
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] for k in adapter if ".lora_A" in k})
    for module in modules:
        a, b = (adapter[f"base_model.model.{module}.lora_{x}.weight"].float() for x in "AB")
        delta = (config["lora_alpha"] / a.shape[0]) * (b @ a)
        magnitude = adapter.get(f"base_model.model.{module}.lora_magnitude_vector")
        key = f"{module}.weight"
        if fault == "dora_norm_dropped":
            merged[key] = base[key] + delta
        elif fault == "delta_rounded_to_bf16":
            w = base[key] + delta.to(torch.bfloat16).float()
            merged[key] = magnitude.float()[:, None] * w / w.norm(dim=1, keepdim=True)
        elif fault == "a_layer_not_merged" and module.startswith("model.layers.2."):
            merged[key] = base[key].clone()
        elif fault == "a_tensor_never_written" and module == "model.layers.3.mlp.down_proj":
            merged[key] = torch.zeros_like(merged[key])  # what a rank that never wrote leaves
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


MERGE_FAULTS = ["dora_norm_dropped", "delta_rounded_to_bf16", "a_layer_not_merged", "a_tensor_never_written"]


@pytest.fixture(scope="module")
def good_merge(cases, tmp_path_factory):
    case = cases("dora_pp2_tied")
    out = tmp_path_factory.mktemp("good") / "merged"
    proc = case.merge(out, "--dtype", "fp32")
    assert "merged_model_vs_peft_max_abs_diff" in proc.stdout, "the merge verified its files"
    return case, out


def verify_merged(case: Case, merged: Path, tmp_path: Path):
    report = tmp_path / "report.json"
    proc = adapter_job(case.binary, "verify", "--hf-model-id", case.base, "--hf-adapter-path", case.adapter,
                       "--megatron-peft-checkpoint", case.written.root, "--merged-model", merged,
                       "--verify-device", "cpu", "--report", report, check=False)
    return proc, json.loads(report.read_text()) if report.exists() else None


def test_correct_merge_passes_verification(good_merge, tmp_path):
    case, good = good_merge
    proc, report = verify_merged(case, good, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = {c["name"]: c["figure"] for c in report["checks"]}
    assert figures["merged_model_vs_peft_max_abs_diff"] == 0, "a correct merge gives the reference logits exactly"
    assert figures["merged_model_weights_within_rounding"] <= 0.1, "ten times inside what rounding allows"


@pytest.mark.parametrize("fault", MERGE_FAULTS)
def test_planted_merge_fault_fails_verification(good_merge, tmp_path, fault):
    case, good = good_merge
    proc, report = verify_merged(case, planted(case, good, tmp_path / fault, fault), tmp_path)
    assert proc.returncode == EXIT_FAILED, proc.stdout + proc.stderr
    failing = [c["name"] for c in report["checks"] if not c["passed"]]
    assert failing and all(name.startswith("merged_model_") for name in failing), failing
    assert "merged_model_weights_within_rounding" in failing, failing


# ---------------------------------------------------------------------------------------------------------------
# Every family the export supports (test_families.py's models and checkpoints)

FAMILY_CASES = [("qwen2", "dora", 2, 1), ("qwen3", "canonical_lora", 2, 1), ("mistral", "lora", 1, 2),
                ("gemma", "lora", 2, 1), ("gemma2", "dora", 1, 2), ("gemma3", "lora", 2, 1)]
MOE_CASES = [("qwen3_moe", dict(ep=2, etp=1, share_expert_adapters=False)),
             ("mixtral", dict(ep=2, etp=1, share_expert_adapters=False, normalize_moe_lora=True)),
             ("qwen3_moe", dict(ep=2, etp=1))]


def family_case(tmp_path, binary, base_cfg, **fields):
    base = build_tiny_llama(base_cfg, tmp_path / "base")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers, **fields)
    written = write_checkpoint(cfg)
    adapter_job(binary, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                "--output-hf-path", tmp_path / "adapter", "--no-verify")
    out = tmp_path / "merged"
    proc = adapter_job(binary, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                       "--output-hf-path", out, "--dtype", "fp32", "--verify-device", "cpu", np=2)
    assert "verification PASSED" in proc.stdout, proc.stdout
    return base, cfg, written, out


@pytest.mark.parametrize("family,kind,tp,pp", FAMILY_CASES, ids=[f"{f}-{k}" for f, k, _, _ in FAMILY_CASES])
def test_every_dense_family_merges_as_peft(adapter_job_bin, tmp_path, family, kind, tp, pp):
    base_cfg = TinyLlamaConfig(architecture=family, tie_word_embeddings=family.startswith("gemma"),
                               head_dim=32 if family == "qwen3" else 16)
    base, cfg, written, out = family_case(tmp_path, adapter_job_bin, base_cfg, kind=kind, tp=tp, pp=pp)
    ids = tokens(256, 16)
    ours = logits_of(load_merged(out), ids)
    peft = logits_of(peft_merged_model(base, tmp_path / "adapter"), ids)
    assert rel_err(peft, logits_of(load_base(base), ids)) > MIN_EFFECT
    assert rel_err(ours, peft) < REL_TOL, f"{family} {kind}: merged model != PEFT merge_and_unload"


@pytest.mark.parametrize("family,fields", MOE_CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(MOE_CASES)])
def test_moe_experts_merge_as_the_fp32_reference(adapter_job_bin, tmp_path, family, fields):
    base_cfg = TinyLlamaConfig(architecture=family, head_dim=32 if family == "qwen3_moe" else 16)
    base, cfg, written, out = family_case(tmp_path, adapter_job_bin, base_cfg, kind="lora", tp=2, pp=1,
                                          experts=base_cfg.experts, expert_ffn=base_cfg.expert_ffn,
                                          topk=base_cfg.experts_per_token, **fields)
    ids = tokens(256, 16)
    ours = logits_of(load_merged(out), ids)
    reference = merged_reference_logits(base, live_tensors(written), "lora", cfg.alpha, cfg.dim, ids,
                                        nq=cfg.heads, ng=cfg.query_groups, head_dim=cfg.head_dim, ffn=cfg.ffn)
    assert rel_err(reference, logits_of(load_base(base), ids)) > MIN_EFFECT
    assert rel_err(ours, reference) < REL_TOL, f"{family}: merged model != the fp32 merge of the checkpoint"
