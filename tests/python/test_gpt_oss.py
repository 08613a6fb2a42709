"""GPT-OSS (issue 15, part 2): a tiny GptOssForCausalLM of transformers (q/k/v/o biases, attention sinks, alternating
sliding-window and full layers, YaRN RoPE, every layer an MoE of 8 biased experts with the clamped SwiGLU, held fused
as transformers and the hub checkpoints hold them: mlp.experts.gate_up_proj [E, H, 2F] with gate and up columns
alternating, mlp.experts.down_proj [E, F, H]) and checkpoints in Megatron's layout (Megatron-Bridge
models/gpt_oss/gpt_oss_bridge.py: fused QKV per query group, per-expert or shared expert adapters with fc1 rows
[gate; up], LoRA on the router), TP2 x EP2, TP1 x PP2 x EP2.

No per-expert module exists to load into, so the expert adapters go to PEFT as target_parameters: PEFT's ParamWrapper
(tuners/lora/layer.py), lora_A [E x r, in], lora_B [out, r x E] expert-innermost, nested in the order GptOssExperts
registers its parameters. The adapter must load in stock PEFT with no warning and give the logits of an independent
fp32 merge into the fused tensors (tests/python/peft_reference.py); our verification's forward must give transformers'
base logits, stock PEFT's and that merge's, and fail an adapter whose gate and up rows are swapped."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import live_tensors, load_base, logits_of, merged_reference_logits, peft_logits
from test_families import (MPIRUN, PEFT_ATOL, assert_matches_the_references, export, export_verified_and_alone,
                           peft_warnings_beyond_its_moe_conversion)
from test_merge import load_merged
from test_verify import EXIT_BAD_INPUT, EXIT_FAILED, MIN_EFFECT, REL_TOL, prompts_for, rel_err, verify
from tiny_llama import TinyLlamaConfig, build_tiny_llama

BASE = TinyLlamaConfig(architecture="gpt_oss", experts=8, expert_ffn=32)
# Stock PEFT's own float32 noise here: its ParamWrapper forward (the LoRA factors folded per call, transformers'
# grouped_mm experts) and its merge_and_unload model differ by 1.2e-5 of the largest logit on the 96-token prompt
# (the clamped SwiGLU's gate values reach 7). Ours against the unmerged one: 1.07e-5; a wrong layout: > 1e-3.
PEFT_REL_TOL = 5e-5
WITH_ROUTER = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")
# kind, targets (None: all), TP, PP, EP, ranks of the verified export beside -np 1, generator options
CASES = [("lora", None, 2, 1, 2, 4, {"share_expert_adapters": False}),
         ("lora", WITH_ROUTER, 1, 2, 2, 4, {"share_expert_adapters": False}),
         ("lora", None, 2, 1, 2, 2, {"legacy_shared_experts": True}),
         ("lora", None, 2, 1, 2, 2, {"share_expert_adapters": False, "normalize_moe_lora": True}),
         ("dora", ("linear_qkv", "linear_proj"), 2, 1, 1, 2, {})]
PREFIX = "base_model.model.model.layers."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(BASE, tmp_path_factory.mktemp("gpt_oss") / "base")


def checkpoint(base, out, kind="lora", targets=None, tp=2, pp=1, ep=2, **extra):
    return CheckpointConfig(out=out, base_model=base, kind=kind, targets=targets, tp=tp, pp=pp, ep=ep, etp=1,
                            num_layers=BASE.layers, hidden=BASE.hidden, heads=BASE.heads, query_groups=BASE.kv_heads,
                            head_dim=BASE.head_dim, ffn=BASE.ffn, experts=BASE.experts, expert_ffn=BASE.expert_ffn,
                            topk=BASE.experts_per_token, **extra)


@pytest.mark.parametrize("kind,targets,tp,pp,ep,ranks,extra", CASES,
                         ids=["per-expert-tp2ep2", "router-tp1pp2ep2", "legacy-shared", "normalized-ranks",
                              "dora-attention"])
def test_export_loads_in_peft_and_matches_the_references(adapter_job_bin, base, tmp_path, kind, targets, tp, pp, ep,
                                                         ranks, extra):
    cfg = checkpoint(base, tmp_path / "ckpt", kind, targets, tp, pp, ep, **extra)
    written = write_checkpoint(cfg)
    out = export_verified_and_alone(adapter_job_bin, base, written.root, tmp_path / "adapter", ranks)

    tensors = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    assert f"{PREFIX}0.self_attn.k_proj.lora_A.weight" in tensors
    experts, r = BASE.experts, cfg.dim // (BASE.experts_per_token if extra.get("normalize_moe_lora") else 1)
    if targets is None or "linear_fc1" in targets:
        # ParamWrappers: down_proj (registered last) outermost, gate_up_proj under base_layer.
        assert tensors[f"{PREFIX}0.mlp.experts.base_layer.lora_A.weight"].shape == (experts * r, BASE.hidden)
        assert tensors[f"{PREFIX}0.mlp.experts.base_layer.lora_B.weight"].shape == (2 * BASE.expert_ffn, r * experts)
        assert tensors[f"{PREFIX}0.mlp.experts.lora_A.weight"].shape == (experts * r, BASE.expert_ffn)
        assert tensors[f"{PREFIX}0.mlp.experts.lora_B.weight"].shape == (BASE.hidden, r * experts)
        assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(config["target_parameters"])
        assert config["lora_dropout"] == 0.0  # PEFT's ParamWrapper refuses any
    else:
        assert not any(".mlp." in n for n in tensors) and "target_parameters" not in config
    if targets is WITH_ROUTER:
        assert f"{PREFIX}1.mlp.router.lora_B.weight" in tensors and "mlp.router.weight" in config["target_parameters"]
    assert config["rank_pattern"] == ({r"mlp\.experts\.gate_up_proj": r, r"mlp\.experts\.down_proj": r}
                                      if r != cfg.dim else {}), config["rank_pattern"]

    prompts = prompts_for(BASE.vocab)
    peft = peft_logits(base, out, prompts[0])
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    # Ranks below r (normalize_moe_lora) need rank_pattern entries for the parameters: PEFT applies them but its
    # unmatched-pattern check looks at module names only and reports them (the documented PEFT 0.21 notice).
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    assert bool(peft.warnings) == bool(config["rank_pattern"]), peft.warnings
    assert_matches_the_references(adapter_job_bin, f"gpt_oss {kind}", base, out, written, cfg, kind, prompts, peft,
                                  tmp_path, PEFT_REL_TOL)


def test_swapped_gate_and_up_fail_verification(adapter_job_bin, base, tmp_path):
    """Planted fault: every expert's gate and up rows of lora_B swapped (Megatron's [gate; up] read as [up; gate])
    loads in PEFT without a word but changes its logits; verification must fail it against the checkpoint."""
    cfg = checkpoint(base, tmp_path / "ckpt", share_expert_adapters=False)
    written = write_checkpoint(cfg)
    out = tmp_path / "adapter"
    assert export(adapter_job_bin, base, written.root, out, 1, "--no-verify").returncode == 0
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    tensors = load_file(planted / "adapter_model.safetensors")
    for name in [n for n in tensors if n.endswith("mlp.experts.base_layer.lora_B.weight")]:
        b = tensors[name]
        tensors[name] = b.view(BASE.expert_ffn, 2, -1).flip(1).reshape(b.shape).contiguous()
    save_file(tensors, planted / "adapter_model.safetensors", metadata={"format": "pt"})

    prompts = prompts_for(BASE.vocab)
    reference = merged_reference_logits(base, live_tensors(written), "lora", cfg.alpha, cfg.dim, prompts[0])
    assert (peft_logits(base, out, prompts[0]).logits - reference).abs().max().item() < PEFT_ATOL
    wrong = (peft_logits(base, planted, prompts[0]).logits - reference).abs().max().item()
    assert wrong > 10 * PEFT_ATOL, f"swapped gate and up still match ({wrong:.3g})"
    v = verify(adapter_job_bin, base, planted, tmp_path / "verify-planted", prompts, ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout


@pytest.mark.parametrize("targets", [None, ("linear_qkv", "router")], ids=["experts", "router"])
def test_dropout_on_a_parameter_target_is_refused_as_peft_refuses_it(adapter_job_bin, base, tmp_path, targets):
    """PEFT's ParamWrapper raises on lora_dropout > 0, for a fused expert parameter and for the router's 2-D weight
    alike: an adapter_config.json saying so is bad input to verify, named."""
    cfg = checkpoint(base, tmp_path / "ckpt", targets=targets, share_expert_adapters=False)
    written = write_checkpoint(cfg)
    out = tmp_path / "adapter"
    assert export(adapter_job_bin, base, written.root, out, 1, "--no-verify").returncode == 0
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.1}))
    proc = run([adapter_job_bin, "verify", "--hf-model-id", base, "--hf-adapter-path", out, "--verify-device", "cpu",
                "--megatron-peft-checkpoint", written.root], check=False)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "ParamWrapper" in proc.stderr and "lora_dropout" in proc.stderr, proc.stderr


@pytest.mark.parametrize("dtype", ["fp32", "auto"])
def test_merged_model_loads_in_transformers_and_equals_the_fp32_merge(adapter_job_bin, base, tmp_path, dtype):
    """`adapter_job merge` folds the ParamWrapper adapters into the fused expert tensors themselves (and the router's
    and attention's into theirs), verified on the way against PEFT's merge slice by slice; stock transformers loads
    the result with no warning, and in fp32 it gives the logits of the independent fp32 merge."""
    written = write_checkpoint(checkpoint(base, tmp_path / "ckpt", targets=WITH_ROUTER, share_expert_adapters=False))
    out = tmp_path / "merged"
    proc = run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", out, "--dtype", dtype, "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    merged = load_merged(out)
    if dtype != "fp32":
        return
    ids = prompts_for(BASE.vocab)[1]
    reference = merged_reference_logits(base, live_tensors(written), "lora", 16, 8, ids)
    assert rel_err(reference, logits_of(load_base(base), ids)) > MIN_EFFECT
    assert rel_err(logits_of(merged, ids), reference) < REL_TOL, "merged model != the fp32 merge of the checkpoint"


def test_a_merge_that_misses_an_expert_fails_verification(adapter_job_bin, base, tmp_path):
    """Planted fault: one expert's slice of a merged gate_up_proj put back to the base's; verify --merged-model must
    fail it (the comparison covers the fused tensors slice by slice)."""
    written = write_checkpoint(checkpoint(base, tmp_path / "ckpt", share_expert_adapters=False))
    out = tmp_path / "merged"
    proc = run([adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                "--output-hf-path", out, "--dtype", "fp32", "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    adapter = tmp_path / "adapter"
    assert export(adapter_job_bin, base, written.root, adapter, 1, "--no-verify").returncode == 0
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors[name][3] = load_file(base / "model.safetensors")[name][3].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    v = verify(adapter_job_bin, base, adapter, tmp_path / "verify", prompts_for(BASE.vocab), ckpt=written.root,
               extra=("--merged-model", out))
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout


def test_merge_refuses_mxfp4_experts_by_name(adapter_job_bin, base, tmp_path):
    """A base whose experts are MXFP4 (the hub's GPT-OSS) cannot take the merge in place: exit 2 naming the
    parameter and the way out, no output."""
    quantized = tmp_path / "mxfp4"
    shutil.copytree(base, quantized)
    tensors = load_file(base / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        blocks, scales = to_mxfp4(tensors.pop(name))
        tensors |= {name + "_blocks": blocks, name + "_scales": scales}
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    written = write_checkpoint(checkpoint(base, tmp_path / "ckpt", share_expert_adapters=False))
    proc = run([adapter_job_bin, "merge", "--hf-model-id", quantized, "--megatron-peft-checkpoint", written.root,
                "--output-hf-path", tmp_path / "merged"], check=False)
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "stores as MXFP4" in proc.stderr and "model.layers.0.mlp.experts." in proc.stderr, proc.stderr
    assert not (tmp_path / "merged").exists()


# FP4 (e2m1) values by their 4-bit code, as the OCP MX format defines them.
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def to_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] (as transformers holds GPT-OSS's experts) -> the hub's uint8 blocks [E, out, in / 32, 16] (two
    codes a byte, the low nibble first) and scales [E, out, in / 32] (2^(s - 127) per 32 values); written here
    from the format, so that transformers' own dequantization can judge ours."""
    t = weight.float().transpose(1, 2)
    groups = t.reshape(*t.shape[:2], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(2.0 ** -100) / 6.0))
    codes = ((groups / torch.exp2(exponent)[..., None])[..., None] - FP4_VALUES).abs().argmin(-1)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def test_an_mxfp4_base_is_dequantized_as_transformers_does_it(adapter_job_bin, base, tmp_path):
    """The GPT-OSS hub checkpoints store the experts as MXFP4 (`mlp.experts.gate_up_proj_blocks`/`_scales`). Exporting
    and verifying against such a base must give what the same model dequantized by transformers
    (integrations/mxfp4.py convert_moe_packed_tensors) gives: a passing verification, and base logits equal to
    transformers' on the dequantized copy."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    quantized, dequantized = tmp_path / "mxfp4", tmp_path / "dequantized"
    for d in (quantized, dequantized):
        shutil.copytree(base, d)
    tensors = load_file(base / "model.safetensors")
    as_quantized, as_dequantized = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        blocks, scales = to_mxfp4(tensors[name])
        del as_quantized[name]
        as_quantized |= {name + "_blocks": blocks, name + "_scales": scales}
        as_dequantized[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert (as_dequantized[name] - tensors[name].float()).abs().max() < 0.5 * tensors[name].float().abs().max()
    save_file(as_quantized, quantized / "model.safetensors", metadata={"format": "pt"})
    save_file(as_dequantized, dequantized / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (quantized / "config.json").write_text(json.dumps(config))

    written = write_checkpoint(checkpoint(base, tmp_path / "ckpt", share_expert_adapters=False))
    outs = {}
    for label, model in (("mxfp4", quantized), ("dequantized", dequantized)):
        proc = export(adapter_job_bin, model, written.root, tmp_path / f"out-{label}", 2, "--verify-device", "cpu")
        assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
        outs[label] = tmp_path / f"out-{label}"

    prompts = prompts_for(BASE.vocab)
    v = verify(adapter_job_bin, quantized, outs["mxfp4"], tmp_path / "verify", prompts, ckpt=written.root)
    assert v.rc == 0 and v.report["passed"], v.stdout
    reference = load_base(dequantized)
    for i, ids in enumerate(v.token_ids):
        ids = torch.from_numpy(ids).reshape(1, -1)
        assert rel_err(v.logits[i]["base"], logits_of(reference, ids)[0]) < REL_TOL
