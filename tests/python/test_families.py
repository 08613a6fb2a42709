"""Model families beyond Llama (config/models/*.json): for each, a tiny transformers model of its class (seeded
random weights) and generated TP2 checkpoints. Stock PEFT loads our adapter with no warning and matches the
independent fp32 merge; our verification's forward pass matches transformers' logits and stock PEFT's.

Qwen2 puts a bias on the base q/k/v (the LoRA delta has none); Qwen3 normalises q and k per head and here has a
head_dim other than hidden / heads; Mistral is Llama's layout under another name. Gemma scales norms by 1 + weight
and embeddings by sqrt(hidden), with GeGLU; Gemma 2 adds soft-capping, sandwich norms and (here, 8-token)
sliding-window layers, which the 96-token prompt reaches past; Gemma 3 adds q/k norms and a RoPE per layer type.

Qwen3-MoE and Mixtral put adapters on every expert (Megatron's expert axis [E, ...]; shared adapters are saved once
per expert slot, or, before Megatron-Bridge 0.5.1, once without the axis), sharded by expert parallelism (EP) and
expert TP; the router stays as it is. Their checkpoints are written by EP2 training layouts and exported with one rank
per training shard. OLMoE adds q/k norms over the whole projection, q/k/v clipping and un-renormalised top-k weights
(DeepSeek-V3 and GLM-4.5, with dense first layers and shared experts, have files of their own)."""
import ast
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import live_tensors, load_base, logits_of, merged_reference_logits, peft_logits
from test_verify import MIN_EFFECT, REL_TOL, prompts_for, rel_err, verify
from tiny_llama import TinyLlamaConfig, build_tiny_llama

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
PEFT_ATOL = 1e-4

FAMILIES = {
    "qwen2": (TinyLlamaConfig(architecture="qwen2"), {"self_attn.q_proj.bias", "self_attn.v_proj.bias"}),
    "qwen3": (TinyLlamaConfig(architecture="qwen3", head_dim=32), {"self_attn.q_norm.weight", "self_attn.k_norm.weight"}),
    "mistral": (TinyLlamaConfig(architecture="mistral"), set()),
    "gemma": (TinyLlamaConfig(architecture="gemma", tie_word_embeddings=True), set()),
    "gemma2": (TinyLlamaConfig(architecture="gemma2", tie_word_embeddings=True),
               {"pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"}),
    "gemma3": (TinyLlamaConfig(architecture="gemma3", tie_word_embeddings=True),
               {"pre_feedforward_layernorm.weight", "self_attn.q_norm.weight"}),
}
CASES = [("qwen2", "lora", 2, 1), ("qwen2", "dora", 2, 2), ("qwen3", "lora", 2, 1), ("qwen3", "canonical_lora", 2, 2),
         ("mistral", "lora", 2, 1), ("gemma", "lora", 2, 1), ("gemma2", "lora", 2, 1), ("gemma2", "dora", 2, 2),
         ("gemma3", "lora", 2, 1), ("gemma3", "canonical_lora", 2, 2)]


def export(binary, base, ckpt, out, ranks=1, *extra):
    """`adapter_job export`, under `mpirun -np ranks` when ranks > 1; the process, unchecked."""
    launcher = [*MPIRUN, "-np", str(ranks)] if ranks > 1 else []
    return run([*launcher, binary, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
                "--output-hf-path", out, *extra], check=False)


def export_verified_and_alone(binary, base, ckpt, out, ranks):
    """Exports at -np `ranks` with verification on the CPU (it must pass), and again at -np 1 without it into `out`:
    both must write the same bytes. Returns `out`."""
    out_np = out.with_name(out.name + "-np")
    proc = export(binary, base, ckpt, out_np, ranks, "--verify-device", "cpu")
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    proc = export(binary, base, ckpt, out, 1, "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (out_np / name).read_bytes(), f"{name}: -np 1 and -np {ranks} differ"
    return out


def assert_matches_the_references(binary, label, base, out, written, cfg, kind, prompts, peft, tmp_path,
                                  peft_rel_tol=REL_TOL):
    """Stock PEFT on the export matches the independent fp32 merge (which must move the logits well past the
    tolerance); our verification's base, peft and Megatron-merged logits match transformers, stock PEFT (within
    `peft_rel_tol`) and that merge, on every prompt."""
    def reference(ids):
        return merged_reference_logits(base, live_tensors(written), kind, cfg.alpha, cfg.dim, ids, nq=cfg.heads,
                                       ng=cfg.query_groups, head_dim=cfg.head_dim, ffn=cfg.ffn)
    hf = load_base(base)
    effect = (reference(prompts[0]) - logits_of(hf, prompts[0])).abs().max().item()
    assert effect > MIN_EFFECT, f"the adapter barely changes the logits ({effect:.3g})"
    diff = (peft.logits - reference(prompts[0])).abs().max().item()
    assert diff < PEFT_ATOL, f"{label}: PEFT on the export vs the fp32 merge: max |diff| {diff:.3g}"

    v = verify(binary, base, out, tmp_path / "verify", prompts, ckpt=written.root)
    assert v.rc == 0 and v.report["passed"], v.stdout
    for i, ids in enumerate(v.token_ids):
        ids = torch.from_numpy(ids).reshape(1, -1)
        e_base = rel_err(v.logits[i]["base"], logits_of(hf, ids)[0])
        e_peft = rel_err(v.logits[i]["peft"], peft_logits(base, out, ids).logits[0])
        e_merged = rel_err(v.logits[i]["merged"], reference(ids)[0])
        print(f"\n  {label}, {ids.shape[1]} tokens: base vs transformers {e_base:.3g}, peft vs stock PEFT {e_peft:.3g}, "
              f"Megatron-merged vs the fp32 merge {e_merged:.3g}")
        assert max(e_base, e_merged) < REL_TOL and e_peft < peft_rel_tol, (e_base, e_peft, e_merged)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_llama(cfg, root / name) for name, (cfg, _) in FAMILIES.items()}


@pytest.mark.parametrize("family,kind,tp,pp", CASES, ids=[f"{f}-{k}-tp{t}pp{p}" for f, k, t, p in CASES])
def test_family_export_and_verification(adapter_job_bin, bases, tmp_path, family, kind, tp, pp):
    base_cfg, marker_weights = FAMILIES[family]
    base = bases[family]
    weights = load_file(base / "model.safetensors")
    for suffix in marker_weights:  # what makes the family differ from Llama is really there
        assert f"model.layers.0.{suffix}" in weights, suffix
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind=kind, tp=tp, pp=pp, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers)
    written = write_checkpoint(cfg)
    out = tmp_path / "adapter"
    proc = run([*MPIRUN, "-np", str(tp * pp), adapter_job_bin, "export", "--hf-model-id", base,
                "--megatron-peft-checkpoint", written.root, "--output-hf-path", out, "--verify-device", "cpu"])
    assert "verification PASSED" in proc.stdout, proc.stdout

    prompts = prompts_for(base_cfg.vocab)
    peft = peft_logits(base, out, prompts[0])
    assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
    assert_matches_the_references(adapter_job_bin, f"{family} {kind}", base, out, written, cfg, kind, prompts, peft,
                                  tmp_path)


def test_unsupported_family_is_named_with_the_supported_ones(adapter_job_bin, bases, tmp_path):
    import json
    import shutil
    other = tmp_path / "gpt2ish"
    shutil.copytree(bases["qwen2"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    cfg = CheckpointConfig(out=tmp_path / "ckpt", tp=1, pp=1)
    written = write_checkpoint(cfg)
    proc = run([adapter_job_bin, "export", "--hf-model-id", other, "--megatron-peft-checkpoint", written.root,
                "--output-hf-path", tmp_path / "adapter"], check=False)
    assert proc.returncode == 2
    assert "'GPT2LMHeadModel'" in proc.stderr and "Qwen2ForCausalLM, Qwen3ForCausalLM" in proc.stderr, proc.stderr


# (family, adapters, TP, PP, EP, expert TP, extra CheckpointConfig fields): shared and per-expert adapters, expert TP
# other than TP, per-layer keys (the non-homogeneous stacks of moe_layer_freq > 1), the pre-0.5.1 layout of shared
# adapters, and normalize_moe_lora (expert rank = dim / top-k).
MOE_CASES = [
    ("qwen3_moe", "shared", 2, 1, 2, 1, {}),
    ("qwen3_moe", "per-expert", 2, 1, 2, 2, {"share_expert_adapters": False}),
    ("qwen3_moe", "per-expert-per-layer-keys", 2, 2, 2, 1, {"share_expert_adapters": False, "per_layer_keys": True}),
    ("qwen3_moe", "legacy-shared", 2, 1, 1, 2, {"legacy_shared_experts": True}),
    ("mixtral", "shared", 2, 2, 2, 1, {}),
    ("mixtral", "per-expert-normalized", 2, 1, 2, 1, {"share_expert_adapters": False, "normalize_moe_lora": True}),
    # OLMoE (issue 15): q/k norms over the whole projection, q/k/v clipped, top-k weights not renormalised; 8 experts
    # top-4 here (the real model: 64 top-8).
    ("olmoe", "per-expert", 2, 1, 2, 1, {"share_expert_adapters": False}),
    ("olmoe", "shared", 1, 2, 2, 1, {}),
    # LoRA on the router too (Megatron-Bridge's LoRATopKRouter): PEFT reaches transformers 5's router as a parameter.
    ("qwen3_moe", "per-expert-router", 2, 1, 2, 1,
     {"share_expert_adapters": False, "targets": ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router")}),
]
MOE_BASES = {"qwen3_moe": TinyLlamaConfig(architecture="qwen3_moe", head_dim=32),
             "mixtral": TinyLlamaConfig(architecture="mixtral"),
             "olmoe": TinyLlamaConfig(architecture="olmoe", experts=8, experts_per_token=4)}
# What transformers 5 fuses each family's expert modules into, and their names in the adapter.
EXPERT_LEAVES = {"qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj")),
                 "mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
                 "olmoe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"))}
PATTERN_WARNING = re.compile(r"RuntimeWarning: The following (rank|alpha)_pattern keys did not match any targeted "
                             r"module and were ignored: (\[.*\])\.")


def peft_warnings_beyond_its_moe_conversion(warnings: list[str], rank_pattern: dict) -> list[str]:
    """PEFT 0.21 under transformers 5 loads a per-expert adapter into the fused expert parameters: it adds
    rank/alpha patterns for `.*\\.gate_up_proj` itself (utils/transformers_weight_conversion.py
    _convert_peft_config_moe), and its check for unmatched patterns (tuners_utils.py inject_adapter, PR #3588) then
    looks only at module names, so it reports every pattern aimed at a parameter, and the per-expert ones that
    transformers 5 no longer has as modules, as ignored; both are in fact applied (the logits below prove it). Any
    other warning, or a pattern outside those, is returned."""
    expected = {r".*\.gate_up_proj", *rank_pattern}
    unexpected = []
    for w in warnings:
        match = PATTERN_WARNING.fullmatch(w)
        if match is None or not set(ast.literal_eval(match.group(2))) <= expected:
            unexpected.append(w)
    return unexpected


@pytest.fixture(scope="module")
def moe_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {name: build_tiny_llama(cfg, root / name) for name, cfg in MOE_BASES.items()}


@pytest.mark.parametrize("family,adapters,tp,pp,ep,etp,extra", MOE_CASES,
                         ids=[f"{f}-{a}-tp{t}pp{p}ep{e}etp{x}" for f, a, t, p, e, x, _ in MOE_CASES])
def test_moe_export_and_verification(adapter_job_bin, moe_bases, tmp_path, family, adapters, tp, pp, ep, etp, extra):
    base_cfg, base = MOE_BASES[family], moe_bases[family]
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind="lora", tp=tp, pp=pp, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers, experts=base_cfg.experts,
                           expert_ffn=base_cfg.expert_ffn, topk=base_cfg.experts_per_token, ep=ep, etp=etp, **extra)
    written = write_checkpoint(cfg)
    ranks = pp * max(tp, ep * etp)  # one per training shard
    out = tmp_path / "adapter"
    proc = run([*MPIRUN, "-np", str(ranks), adapter_job_bin, "export", "--hf-model-id", base,
                "--megatron-peft-checkpoint", written.root, "--output-hf-path", out, "--verify-device", "cpu"])
    assert "verification PASSED" in proc.stdout, proc.stdout

    # Every expert of every layer has its own adapter, named as in the base model's checkpoint.
    parent, leaves = EXPERT_LEAVES[family]
    names = set(load_file(out / "adapter_model.safetensors"))
    for layer in range(base_cfg.layers):
        for e in range(base_cfg.experts):
            for leaf in leaves:
                for ab in ("A", "B"):
                    assert f"base_model.model.model.layers.{layer}.{parent}.{e}.{leaf}.lora_{ab}.weight" in names
    config = json.loads((out / "adapter_config.json").read_text())
    if "router" in extra.get("targets", ()):
        assert f"base_model.model.model.layers.1.{parent.rsplit('.', 1)[0]}.gate.lora_A.weight" in names
        assert config["target_parameters"] == [f"{parent.rsplit('.', 1)[0]}.gate.weight"]
    else:
        assert not any(".gate." in n or "router" in n for n in names), "the router must stay untouched"
    assert set(leaves) <= set(config["target_modules"])
    normalized = extra.get("normalize_moe_lora", False)
    assert bool(config["rank_pattern"]) == normalized, config["rank_pattern"]

    prompts = prompts_for(base_cfg.vocab)
    peft = peft_logits(base, out, prompts[0])
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    assert_matches_the_references(adapter_job_bin, f"{family} {adapters}", base, out, written, cfg, "lora", prompts,
                                  peft, tmp_path)


def test_qwen3_moe_dense_layers_reach_peft_as_parameters(adapter_job_bin, tmp_path):
    """Qwen3-MoE's mlp_only_layers keep a dense MLP. PEFT 0.21 on transformers 5 turns the target leaves gate_proj /
    up_proj / down_proj into the fused experts' parameters, so the dense layer's adapters must go out as
    target_parameters or stock PEFT silently drops them (see test_deepseek_v3.py); verification models that."""
    base_cfg = TinyLlamaConfig(architecture="qwen3_moe", head_dim=32, mlp_only_layers=(0,))
    base = build_tiny_llama(base_cfg, tmp_path / "base")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind="lora", tp=2, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers, experts=base_cfg.experts,
                           expert_ffn=base_cfg.expert_ffn, topk=base_cfg.experts_per_token, ep=2, etp=1,
                           first_dense_layers=1, per_layer_keys=True, share_expert_adapters=False)
    written = write_checkpoint(cfg)
    out = tmp_path / "adapter"
    proc = run([*MPIRUN, "-np", "4", adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", out, "--verify-device", "cpu"])
    assert "verification PASSED" in proc.stdout, proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"]
    prompts = prompts_for(base_cfg.vocab)
    peft = peft_logits(base, out, prompts[0])
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    assert_matches_the_references(adapter_job_bin, "qwen3_moe with a dense layer", base, out, written, cfg, "lora",
                                  prompts, peft, tmp_path)


def test_moe_checkpoint_against_the_wrong_base_is_refused(adapter_job_bin, moe_bases, bases, tmp_path):
    base_cfg = MOE_BASES["qwen3_moe"]
    cfg = CheckpointConfig(out=tmp_path / "ckpt", kind="lora", tp=2, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers, experts=8, expert_ffn=base_cfg.expert_ffn,
                           topk=2, ep=2, etp=1)
    written = write_checkpoint(cfg)

    def export(base, name):
        return run([*MPIRUN, "-np", "2", adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint",
                    written.root, "--output-hf-path", tmp_path / name], check=False)

    # 8 experts in the checkpoint, 4 in the model: the tensor and both counts are named.
    proc = export(moe_bases["qwen3_moe"], "four")
    assert proc.returncode == 2, proc.stderr
    assert "mlp.experts.experts.linear_fc1.adapter.linear_in.weight' has per-layer shape [8, 8, 64]" in proc.stderr
    assert "implies [4, 8, 64]" in proc.stderr and "per expert" in proc.stderr, proc.stderr
    # A dense family has no expert modules: the module, the family and what it knows are named.
    proc = export(bases["qwen3"], "dense")
    assert proc.returncode == 2, proc.stderr
    assert "module 'mlp.experts.experts.linear_fc1' has no HuggingFace mapping in the qwen3 family" in proc.stderr
    assert "self_attention.linear_qkv" in proc.stderr
    assert not (tmp_path / "four").exists() and not (tmp_path / "dense").exists()


def test_expert_chunks_that_contradict_the_expert_parallel_size_are_refused(adapter_job_bin, moe_bases, tmp_path):
    import yaml
    base_cfg = MOE_BASES["qwen3_moe"]
    cfg = CheckpointConfig(out=tmp_path / "ckpt", kind="lora", tp=2, heads=base_cfg.heads,
                           query_groups=base_cfg.kv_heads, head_dim=base_cfg.head_dim, hidden=base_cfg.hidden,
                           ffn=base_cfg.ffn, num_layers=base_cfg.layers, experts=base_cfg.experts,
                           expert_ffn=base_cfg.expert_ffn, topk=2, ep=2, etp=1, share_expert_adapters=False)
    written = write_checkpoint(cfg)
    # Each chunk holds an EP rank's 2 experts; a run_config claiming EP 4 (one expert per rank) contradicts it.
    run_config = written.iter_dir / "run_config.yaml"
    settings = yaml.safe_load(run_config.read_text())
    settings["model"]["expert_model_parallel_size"] = 4
    run_config.write_text(yaml.safe_dump(settings))
    proc = run([adapter_job_bin, "export", "--hf-model-id", moe_bases["qwen3_moe"], "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", tmp_path / "adapter"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "mlp.experts.experts.linear_fc1.adapter.linear_in.weight': a chunk holds experts 0 to 1" in proc.stderr
    assert "expert_model_parallel_size 4" in proc.stderr, proc.stderr
    assert not (tmp_path / "adapter").exists()
