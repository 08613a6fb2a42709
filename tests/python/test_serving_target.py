"""--target vllm|sglang (issue 16, part 1): adapters laid out for the engine that serves them.

vLLM's loader keeps r and lora_alpha of adapter_config.json and drops rank_pattern / alpha_pattern
(vllm/lora/peft_helper.py PEFTHelper.from_dict keeps only its dataclass fields; lora_model.py scales every module by
lora_alpha / r), so an adapter whose modules have ranks of their own (normalize_moe_lora: experts at dim / top-k, fc1
rounded up to a multiple of the expert TP) is served with the wrong scale. `--target vllm` writes no patterns: each
module padded with zeros to one rank and its own alpha / rank folded into lora_B. Stock PEFT stands in for vLLM here:
loaded with one global alpha / r, as vLLM computes, the vllm adapter gives the true logits; the PEFT adapter read the
way vLLM reads it does not. vLLM and SGLang refuse DoRA (peft_helper.py, SGLang lora_manager.validate_new_adapter),
and vLLM has no LoRA for an MoE router: those are refused, naming `adapter_job merge`. SGLang honours rank_pattern
(python/sglang/srt/lora/lora_config.py), so its layout is PEFT's. Sources: shared/reference/serving-and-merge.md."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import live_tensors, merged_reference_logits, peft_logits
from test_families import MOE_BASES, PEFT_ATOL, export, peft_warnings_beyond_its_moe_conversion
from test_verify import EXIT_BAD_INPUT, prompts_for
from tiny_llama import TinyLlamaConfig, build_tiny_llama

BASE = MOE_BASES["qwen3_moe"]
DIM, ALPHA = 6, 12  # experts: dim // top-k = 3, fc1 rounded up to 4 by the expert TP of 2: three ranks in one adapter


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    base = build_tiny_llama(BASE, root / "base")
    cfg = CheckpointConfig(out=root / "ckpt", base_model=base, kind="lora", tp=2, heads=BASE.heads,
                           query_groups=BASE.kv_heads, head_dim=BASE.head_dim, hidden=BASE.hidden, ffn=BASE.ffn,
                           num_layers=BASE.layers, experts=BASE.experts, expert_ffn=BASE.expert_ffn,
                           topk=BASE.experts_per_token, ep=2, etp=2, dim=DIM, alpha=ALPHA, normalize_moe_lora=True,
                           share_expert_adapters=False)
    return base, cfg, write_checkpoint(cfg)


def reference(base, cfg, written, ids):
    return merged_reference_logits(base, live_tensors(written), "lora", cfg.alpha, cfg.dim, ids)


def ranks_of(adapter_dir):
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    return {name: t.shape[0] if ".lora_A." in name else t.shape[1] for name, t in tensors.items()}


def test_vllm_adapter_has_one_rank_and_the_true_logits_under_one_alpha_over_r(adapter_job_bin, moe, tmp_path):
    base, cfg, written = moe
    peft_out, vllm_out = tmp_path / "peft", tmp_path / "vllm"
    assert export(adapter_job_bin, base, written.root, peft_out, 1, "--no-verify").returncode == 0
    report = tmp_path / "vllm.json"
    proc = export(adapter_job_bin, base, written.root, vllm_out, 1, "--target", "vllm", "--verify-device", "cpu",
                  "--report", report)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert "--max-lora-rank 8" in proc.stdout, proc.stdout
    summary = json.loads(report.read_text())
    assert summary["target"] == "vllm" and "folded into lora_B" in summary["target_note"], summary

    # The PEFT adapter has three ranks and says so in rank_pattern; the vLLM one has one rank and no patterns.
    assert sorted(set(ranks_of(peft_out).values())) == [3, 4, 6]
    assert set(ranks_of(vllm_out).values()) == {DIM}
    config = json.loads((vllm_out / "adapter_config.json").read_text())
    assert config["r"] == DIM and config["lora_alpha"] == ALPHA
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert json.loads((peft_out / "adapter_config.json").read_text())["rank_pattern"]

    # Padding is zeros; each lora_B scaled by dim / its rank: 2 for fc2 (exact in bf16, which it stays), 1.5 for fc1
    # (not exact in bf16: written float32, for the engine to round once).
    p, v = load_file(peft_out / "adapter_model.safetensors"), load_file(vllm_out / "adapter_model.safetensors")
    down = "base_model.model.model.layers.0.mlp.experts.1.down_proj.lora_"
    gate = "base_model.model.model.layers.0.mlp.experts.1.gate_proj.lora_"
    assert torch.equal(v[down + "A.weight"][:3], p[down + "A.weight"]) and not v[down + "A.weight"][3:].any()
    assert torch.equal(v[down + "B.weight"][:, :3], 2 * p[down + "B.weight"]) and not v[down + "B.weight"][:, 3:].any()
    assert v[down + "B.weight"].dtype == torch.bfloat16 and v[gate + "B.weight"].dtype == torch.float32
    assert torch.equal(v[gate + "B.weight"][:, :4], 1.5 * p[gate + "B.weight"].float())
    assert "float32" in summary["target_note"], summary

    for ids in prompts_for(BASE.vocab):
        peft = peft_logits(base, vllm_out, ids)
        assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
        assert peft_warnings_beyond_its_moe_conversion(peft.warnings, {}) == [], peft.warnings
        diff = (peft.logits - reference(base, cfg, written, ids)).abs().max().item()
        assert diff < PEFT_ATOL, diff


def test_the_peft_adapter_as_vllm_reads_it_is_far_off(adapter_job_bin, moe, tmp_path):
    """What vLLM does with the PEFT layout: one alpha / r for every module, each module's own tensors as they are
    (padded to r here, which changes nothing, so that stock PEFT loads them without rank_pattern)."""
    base, cfg, written = moe
    out = tmp_path / "peft"
    assert export(adapter_job_bin, base, written.root, out, 1, "--no-verify").returncode == 0
    tensors = load_file(out / "adapter_model.safetensors")
    for name, t in tensors.items():
        rank = t.shape[0] if ".lora_A." in name else t.shape[1]
        pad = torch.zeros((DIM - rank, t.shape[1]) if ".lora_A." in name else (t.shape[0], DIM - rank), dtype=t.dtype)
        tensors[name] = torch.cat([t, pad], 0 if ".lora_A." in name else 1).contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {}, "alpha_pattern": {}}))
    ids = prompts_for(BASE.vocab)[1]
    wrong = (peft_logits(base, out, ids).logits - reference(base, cfg, written, ids)).abs().max().item()
    print(f"\n  the PEFT adapter under vLLM's one alpha / r: max |logit - true| {wrong:.3g} (tolerance {PEFT_ATOL})")
    assert wrong > 100 * PEFT_ATOL, wrong


def test_sglang_layout_is_peft_s(adapter_job_bin, moe, tmp_path):
    base, _, written = moe
    for target in ("peft", "sglang"):
        proc = export(adapter_job_bin, base, written.root, tmp_path / target, 1, "--target", target, "--no-verify")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "sglang" / name).read_bytes(), name


@pytest.mark.parametrize("target", ["vllm", "sglang"])
def test_dora_is_refused_naming_merge(adapter_job_bin, tmp_path, target):
    base = build_tiny_llama(TinyLlamaConfig(), tmp_path / "base")
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind="dora"))
    proc = export(adapter_job_bin, base, written.root, tmp_path / "out", 1, "--target", target, "--no-verify")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "does not load DoRA adapters" in proc.stderr and "adapter_job merge" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_vllm_refuses_a_router_adapter(adapter_job_bin, tmp_path):
    base = build_tiny_llama(BASE, tmp_path / "base")
    written = write_checkpoint(CheckpointConfig(
        out=tmp_path / "ckpt", base_model=base, kind="lora", heads=BASE.heads, query_groups=BASE.kv_heads,
        head_dim=BASE.head_dim, hidden=BASE.hidden, ffn=BASE.ffn, num_layers=BASE.layers, experts=BASE.experts,
        expert_ffn=BASE.expert_ffn, topk=BASE.experts_per_token,
        targets=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")))
    proc = export(adapter_job_bin, base, written.root, tmp_path / "out", 1, "--target", "vllm", "--no-verify")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "mlp.gate' is the MoE router's adapter" in proc.stderr and "adapter_job merge" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run([adapter_job_bin, "export", "--target", "tgi", "--hf-model-id", base, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", tmp_path / "tgi"], check=False)
    assert proc.returncode == EXIT_BAD_INPUT and "--target must be peft, vllm or sglang" in proc.stderr, proc.stderr
