"""GLM-4.5 / GLM-4.5-Air (issue 15, part 3): a tiny Glm4MoeForCausalLM of transformers (q/k/v biases, RoPE on half of
each head, one dense first layer, then MoE layers of 8 routed experts in 2 groups behind a sigmoid router with
correction bias, plus a shared expert) and checkpoints in Megatron's layout (Megatron-Bridge models/glm/glm45_bridge.py:
fused QKV per query group, the dense layer's fc1/fc2, the shared experts' and every routed expert's own adapters,
per-layer keys), TP2 x EP2 and TP1 x EP2 x PP2.

The adapter must load in stock PEFT with no warning beyond its documented fused-expert pattern notices and give the
logits of an independent fp32 merge; our verification's forward must give transformers' base logits, stock PEFT's and
the merge's, and fail an adapter whose shared-expert adapters were dropped."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import live_tensors, merged_reference_logits, peft_logits
from test_families import (PEFT_ATOL, assert_matches_the_references, export, export_verified_and_alone,
                           peft_warnings_beyond_its_moe_conversion)
from test_verify import EXIT_FAILED, prompts_for, verify
from tiny_llama import TinyLlamaConfig, build_tiny_llama

BASE = TinyLlamaConfig(architecture="glm4_moe", experts=8, expert_ffn=32)
# kind, TP, PP, EP, ranks of the verified export beside -np 1
CASES = [("lora", 2, 1, 2, 4), ("lora", 1, 2, 2, 4)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(BASE, tmp_path_factory.mktemp("glm4_moe") / "base")


def checkpoint(base, out, tp=2, pp=1, ep=2):
    return CheckpointConfig(out=out, base_model=base, kind="lora", tp=tp, pp=pp, ep=ep, etp=1,
                            num_layers=BASE.layers, hidden=BASE.hidden, heads=BASE.heads, query_groups=BASE.kv_heads,
                            head_dim=BASE.head_dim, ffn=BASE.ffn, experts=BASE.experts, expert_ffn=BASE.expert_ffn,
                            topk=BASE.experts_per_token, first_dense_layers=BASE.first_dense_layers,
                            shared_expert_ffn=BASE.expert_ffn * BASE.shared_experts, share_expert_adapters=False,
                            per_layer_keys=True)


@pytest.mark.parametrize("kind,tp,pp,ep,ranks", CASES, ids=[f"{k}-tp{t}pp{p}ep{e}-np{n}" for k, t, p, e, n in CASES])
def test_export_loads_in_peft_and_matches_the_references(adapter_job_bin, base, tmp_path, kind, tp, pp, ep, ranks):
    cfg = checkpoint(base, tmp_path / "ckpt", tp, pp, ep)
    written = write_checkpoint(cfg)
    out = export_verified_and_alone(adapter_job_bin, base, written.root, tmp_path / "adapter", ranks)

    names = set(load_file(out / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers."
    assert f"{prefix}0.mlp.gate_proj.lora_A.weight" in names and f"{prefix}0.self_attn.k_proj.lora_B.weight" in names
    assert f"{prefix}2.mlp.shared_experts.down_proj.lora_B.weight" in names
    assert f"{prefix}3.mlp.experts.7.up_proj.lora_B.weight" in names
    assert not any(".mlp.gate." in n for n in names), "the router must stay untouched"
    config = json.loads((out / "adapter_config.json").read_text())
    assert "mlp.shared_experts.gate_proj.weight" in config["target_parameters"]

    prompts = prompts_for(BASE.vocab)
    peft = peft_logits(base, out, prompts[0])
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    assert_matches_the_references(adapter_job_bin, f"glm4_moe tp{tp}pp{pp}ep{ep}", base, out, written, cfg, kind,
                                  prompts, peft, tmp_path)


def test_a_dropped_shared_expert_adapter_fails(adapter_job_bin, base, tmp_path):
    """The planted fault: the shared experts' adapters of one layer left out of an otherwise correct export. Stock
    PEFT then leaves those modules at their zero-initialised adapters, far from the merge; our
    verification fails it."""
    written = write_checkpoint(checkpoint(base, tmp_path / "ckpt"))
    out = tmp_path / "adapter"
    proc = export(adapter_job_bin, base, written.root, out, 1, "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    tensors = {k: v for k, v in load_file(out / "adapter_model.safetensors").items()
               if ".layers.2.mlp.shared_experts." not in k}
    save_file(tensors, planted / "adapter_model.safetensors", metadata={"format": "pt"})
    prompts = prompts_for(BASE.vocab)
    reference = merged_reference_logits(base, live_tensors(written), "lora", 16, 8, prompts[0])
    wrong = (peft_logits(base, planted, prompts[0]).logits - reference).abs().max().item()
    assert wrong > 10 * PEFT_ATOL, f"a dropped shared expert still matches ({wrong:.3g})"
    v = verify(adapter_job_bin, base, planted, tmp_path / "verify-planted", prompts, ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout
