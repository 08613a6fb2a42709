"""DeepSeek-V3 architecture (issue 15, part 1): a tiny DeepseekV3ForCausalLM of transformers (MLA with a q LoRA rank
or without one, YaRN RoPE on interleaved pairs, one dense first layer, then MoE layers of 8 routed experts in 2 groups
with a sigmoid router and correction bias, plus a shared expert) and checkpoints in Megatron's layout: MLA adapters on
linear_q_down_proj / linear_q_up_proj (or linear_q_proj), linear_kv_down_proj, linear_kv_up_proj and linear_proj, the
dense layer's linear_fc1/fc2, the shared experts' and every routed expert's own adapters, under per-layer keys
(Megatron's non-homogeneous layers), TP2 x EP2.

The exported adapter must load in stock PEFT with no warning beyond its documented fused-expert pattern notices and
give the logits of an independent fp32 merge of the Megatron tensors into the base (tests/python/peft_reference.py,
which maps the modules one to one from Megatron-Bridge's models/deepseek/common.py); our verification's forward must
give transformers' base logits, stock PEFT's and that merge's, and fail an adapter with kv_b_proj's per-head
[k_nope; v] rows swapped."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, Mla, write_checkpoint
from peft_reference import (hf_adapters, live_tensors, load_base, logits_of, merged_reference_logits, merged_weight,
                            peft_logits)
from test_families import (MPIRUN, PEFT_ATOL, assert_matches_the_references, export, export_verified_and_alone,
                           peft_warnings_beyond_its_moe_conversion)
from test_merge import load_merged
from test_verify import EXIT_FAILED, MIN_EFFECT, REL_TOL, prompts_for, rel_err, verify
from tiny_llama import TinyLlamaConfig, build_tiny_llama

FAMILIES_DIR = Path(__file__).resolve().parents[2] / "config" / "models"
BASES = {"mla": TinyLlamaConfig(architecture="deepseek_v3", experts=8, expert_ffn=32),
         "mla-no-q-lora": TinyLlamaConfig(architecture="deepseek_v3", experts=8, expert_ffn=32, q_lora_rank=0)}
ATTENTION = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj")
# base, kind, targets (None: all), TP, EP, ranks of the export beside -np 1
ALL_WITH_ROUTER = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
                   "linear_fc1", "linear_fc2", "router")
CASES = [("mla", "lora", None, 2, 2, 4),
         ("mla", "lora", ALL_WITH_ROUTER, 2, 2, 4),
         ("mla", "dora", ATTENTION, 2, 1, 2),
         ("mla-no-q-lora", "lora", None, 1, 2, 2)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek_v3")
    return {name: build_tiny_llama(cfg, root / name) for name, cfg in BASES.items()}


def checkpoint(base_name, base, kind, targets, tp, ep, out):
    b = BASES[base_name]
    mla = Mla(b.q_lora_rank, b.kv_lora_rank, b.qk_nope_head_dim, b.qk_rope_head_dim, b.v_head_dim)
    return CheckpointConfig(out=out, base_model=base, kind=kind, targets=targets, tp=tp, ep=ep, etp=1,
                            num_layers=b.layers, hidden=b.hidden, heads=b.heads, query_groups=b.heads, ffn=b.ffn,
                            experts=b.experts, expert_ffn=b.expert_ffn, topk=b.experts_per_token, mla=mla,
                            first_dense_layers=b.first_dense_layers, shared_expert_ffn=b.expert_ffn * b.shared_experts,
                            share_expert_adapters=False, per_layer_keys=True)


def with_kv_b_halves_swapped(adapter_dir: Path, out: Path, layer: int, b: TinyLlamaConfig) -> Path:
    """A copy of the adapter whose kv_b_proj lora_B in `layer` has each head's [k_nope; v] rows as [v; k_nope]."""
    shutil.copytree(adapter_dir, out)
    tensors = load_file(out / "adapter_model.safetensors")
    key = f"base_model.model.model.layers.{layer}.self_attn.kv_b_proj.lora_B.weight"
    heads = tensors[key].reshape(b.heads, b.qk_nope_head_dim + b.v_head_dim, -1)
    tensors[key] = torch.cat([heads[:, b.qk_nope_head_dim:], heads[:, :b.qk_nope_head_dim]], 1).reshape(
        tensors[key].shape).contiguous()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("base_name,kind,targets,tp,ep,ranks", CASES,
                         ids=[f"{b}-{k}{'-router' if g is ALL_WITH_ROUTER else ''}-tp{t}ep{e}-np{n}"
                              for b, k, g, t, e, n in CASES])
def test_export_loads_in_peft_and_matches_the_fp32_merge(adapter_job_bin, bases, tmp_path, base_name, kind, targets,
                                                         tp, ep, ranks):
    base, b = bases[base_name], BASES[base_name]
    cfg = checkpoint(base_name, base, kind, targets, tp, ep, tmp_path / "ckpt")
    written = write_checkpoint(cfg)
    out = export_verified_and_alone(adapter_job_bin, base, written.root, tmp_path / "adapter", ranks)

    # Names as the base model has its modules: MLA one to one, the dense layer's MLP, then experts and shared ones.
    names = set(load_file(out / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers."
    q = ("q_proj",) if b.q_lora_rank == 0 else ("q_a_proj", "q_b_proj")
    for layer in range(b.layers):
        for leaf in (*q, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert f"{prefix}{layer}.self_attn.{leaf}.lora_A.weight" in names
        if targets is ALL_WITH_ROUTER and layer >= b.first_dense_layers:
            assert f"{prefix}{layer}.mlp.gate.lora_B.weight" in names
        if targets is None and layer < b.first_dense_layers:
            assert f"{prefix}{layer}.mlp.gate_proj.lora_B.weight" in names
            assert not any(n.startswith(f"{prefix}{layer}.mlp.experts.") for n in names)
        elif targets is None:
            assert f"{prefix}{layer}.mlp.shared_experts.up_proj.lora_B.weight" in names
            assert f"{prefix}{layer}.mlp.experts.{b.experts - 1}.down_proj.lora_A.weight" in names
            assert f"{prefix}{layer}.mlp.gate_proj.lora_A.weight" not in names
    if targets is not ALL_WITH_ROUTER:
        assert not any(".mlp.gate." in n for n in names), "the router must stay untouched"
    if kind == "dora":
        assert f"{prefix}1.self_attn.kv_b_proj.lora_magnitude_vector" in names

    prompts = prompts_for(b.vocab)
    peft = peft_logits(base, out, prompts[0])
    config = json.loads((out / "adapter_config.json").read_text())
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    assert_matches_the_references(adapter_job_bin, f"deepseek_v3 {base_name} {kind}", base, out, written, cfg, kind,
                                  prompts, peft, tmp_path)

    # Both references see MLA's layout: kv_b_proj's per-head [k_nope; v] rows swapped in one layer are far off for
    # stock PEFT, and our verification fails them.
    planted = with_kv_b_halves_swapped(out, tmp_path / "planted", 1, b)
    reference = merged_reference_logits(base, live_tensors(written), kind, cfg.alpha, cfg.dim, prompts[0])
    wrong = (peft_logits(base, planted, prompts[0]).logits - reference).abs().max().item()
    assert wrong > 10 * PEFT_ATOL, f"swapped kv_b_proj halves still match ({wrong:.3g})"
    v = verify(adapter_job_bin, base, planted, tmp_path / "verify-planted", prompts, ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout


def test_peft_would_drop_dense_and_shared_mlp_adapters_targeted_by_leaf(adapter_job_bin, bases, tmp_path):
    """PEFT 0.21 on transformers 5 turns the target_modules leaves gate_proj/up_proj/down_proj of a DeepSeek-V3
    model into the fused experts' parameters (utils/transformers_weight_conversion.py _convert_peft_config_moe), so
    the dense first layer's MLP and the shared experts, targeted by those leaves as Megatron-Bridge's export does,
    are silently left unwrapped. Our export targets them through target_parameters instead; the same adapter with
    them as leaves loads with no warning but gives other logits, and our verification, which models PEFT's
    conversion, fails it rather than pass it."""
    base = bases["mla"]
    written = write_checkpoint(checkpoint("mla", base, "lora", None, 1, 2, tmp_path / "ckpt"))
    out = tmp_path / "adapter"
    proc = export(adapter_job_bin, base, written.root, out, 1, "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(f"mlp.{s}{leaf}.weight" for s in ("", "shared_experts.")
                                                 for leaf in ("down_proj", "gate_proj", "up_proj"))
    assert {"gate_proj", "up_proj", "down_proj"} <= set(config["target_modules"]), "the experts keep their leaves"

    by_leaf = tmp_path / "by-leaf"
    shutil.copytree(out, by_leaf)
    del config["target_parameters"]
    (by_leaf / "adapter_config.json").write_text(json.dumps(config, indent=2))
    prompts = prompts_for(BASES["mla"].vocab)
    reference = merged_reference_logits(base, live_tensors(written), "lora", 16, 8, prompts[0])
    dropped = peft_logits(base, by_leaf, prompts[0])
    assert dropped.missing == [] and len(dropped.unexpected) == 24, dropped.unexpected  # 1 dense + 3 shared MLPs
    assert (dropped.logits - reference).abs().max().item() > 10 * PEFT_ATOL
    v = verify(adapter_job_bin, base, by_leaf, tmp_path / "verify-by-leaf", prompts, ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout


def test_merged_model_loads_in_transformers_and_equals_the_fp32_merge(adapter_job_bin, bases, tmp_path):
    """`adapter_job merge` on DeepSeek-V3 (issue 14's every family): MLA, the dense layer, shared and per-expert
    adapters folded into the base's own per-expert tensors, verified on the way, loaded by stock transformers with
    no warning, and the logits of the independent fp32 merge."""
    base = bases["mla"]
    written = write_checkpoint(checkpoint("mla", base, "lora", None, 2, 2, tmp_path / "ckpt"))
    out = tmp_path / "merged"
    proc = run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", out, "--dtype", "fp32", "--verify-device", "cpu"], check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    ids = prompts_for(BASES["mla"].vocab)[1]
    ours = logits_of(load_merged(out), ids)
    reference = merged_reference_logits(base, live_tensors(written), "lora", 16, 8, ids)
    assert rel_err(reference, logits_of(load_base(base), ids)) > MIN_EFFECT
    assert rel_err(ours, reference) < REL_TOL, "merged model != the fp32 merge of the checkpoint"


def test_excluded_prefixes_are_left_out_and_reported(adapter_job_bin, bases, tmp_path):
    """--exclude-adapter-base-prefix (Megatron-Bridge's flag) leaves the dense layer's MLP adapters out on purpose:
    the adapter lacks them, the report lists them, and verification's Megatron merge leaves them out too, so it
    passes; a prefix that matches nothing is an error, not a quiet no-op."""
    base = bases["mla"]
    written = write_checkpoint(checkpoint("mla", base, "lora", None, 1, 2, tmp_path / "ckpt"))
    out, report = tmp_path / "adapter", tmp_path / "report.json"
    proc = export(adapter_job_bin, base, written.root, out, 1, "--verify-device", "cpu", "--report", report,
                  "--exclude-adapter-base-prefix", "decoder.layers.0.mlp.")
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    names = set(load_file(out / "adapter_model.safetensors"))
    assert not any(".layers.0.mlp." in n for n in names) and any(".layers.1.mlp." in n for n in names)
    excluded = json.loads(report.read_text())["excluded_adapter_tensors"]
    assert sorted(excluded) == sorted(f"decoder.layers.0.mlp.linear_fc{i}.adapter.linear_{p}.weight"
                                      for i in (1, 2) for p in ("in", "out")), excluded
    assert "left out 4 adapter tensors on purpose" in proc.stdout, proc.stdout
    # PEFT is told to leave the dense layer's MLP alone: no wrapped module waits for a missing key.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["exclude_modules"] == [f"model.layers.0.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    peft = peft_logits(base, out, prompts_for(BASES["mla"].vocab)[0])
    assert peft.missing == [] and peft.unexpected == [], (peft.missing[:3], peft.unexpected[:3])
    assert peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == [], peft.warnings
    # `adapter_job verify` given the same exclusions agrees; without them its Megatron merge holds the dense layer's
    # MLP adapters the export left out, and the verdict is FAIL.
    prompts = prompts_for(BASES["mla"].vocab)
    v = verify(adapter_job_bin, base, out, tmp_path / "verify-excluded", prompts, ckpt=written.root,
               extra=("--exclude-adapter-base-prefix", "decoder.layers.0.mlp."))
    assert v.rc == 0 and v.report["passed"], v.stdout
    v = verify(adapter_job_bin, base, out, tmp_path / "verify-all", prompts, ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout
    # One layer's experts cannot be left out of transformers' fused experts.
    proc = export(adapter_job_bin, base, written.root, tmp_path / "experts", 1, "--no-verify",
                  "--exclude-adapter-base-prefix", "decoder.layers.1.mlp.experts.")
    assert proc.returncode == 2 and "fused experts" in proc.stderr, proc.stdout + proc.stderr
    proc = export(adapter_job_bin, base, written.root, tmp_path / "typo", 1, "--no-verify",
                  "--exclude-adapter-base-prefix", "decoder.layer.0.mlp.")
    assert proc.returncode == 2 and "matches no adapter tensor" in proc.stderr, proc.stdout + proc.stderr


def test_an_unmapped_module_is_named(adapter_job_bin, bases, tmp_path):
    """A Megatron module the family does not know (here Qwen3-Next's linear_qkvz, say) is an error naming the key
    and the modules it knows, not a silent drop."""
    base = bases["mla"]
    written = write_checkpoint(checkpoint("mla", base, "lora", ATTENTION, 1, 1, tmp_path / "ckpt"))
    custom = tmp_path / "families"
    custom.mkdir()
    narrowed = json.loads((FAMILIES_DIR / "deepseek_v3.json").read_text())
    narrowed["modules"] = [m for m in narrowed["modules"] if m["megatron"] != "self_attention.linear_kv_up_proj"]
    (custom / "deepseek_v3.json").write_text(json.dumps(narrowed))
    proc = export(adapter_job_bin, base, written.root, tmp_path / "adapter", 1, "--no-verify",
                  "--model-families", custom)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "self_attention.linear_kv_up_proj" in proc.stderr and "no HuggingFace mapping" in proc.stderr, proc.stderr


def test_mtp_layers_are_exported_merged_and_verified_when_asked(adapter_job_bin, tmp_path, monkeypatch):
    """DeepSeek-V3's multi-token prediction layer: Megatron saves its adapters as mtp.layers.0.mtp_model_layer.*, on
    the last pipeline stage. Left out and listed by default; with --include-mtp-layers written as layer num_layers
    (where the hub's checkpoint, and this base, keep the MTP layer's weights), each module's update s*B@A equal to
    the independent fp32 mapping of the Megatron tensors (peft_reference's, as for a decoder layer), at TP2 x PP2 x
    EP2 over 4 ranks; verification's weight check of that layer passes, and fails an adapter whose MTP kv_b_proj
    has its per-head halves swapped, which no logit sees. `merge` folds it into the base's MTP tensors, which
    transformers' own MtpModel then loads."""
    b = dataclasses.replace(BASES["mla"], mtp_layers=1)
    base = build_tiny_llama(b, tmp_path / "base")
    cfg = dataclasses.replace(checkpoint("mla", base, "lora", None, 2, 2, tmp_path / "ckpt"), pp=2, mtp_layers=1)
    written = write_checkpoint(cfg)
    mtp_prefix, n = "mtp.layers.0.mtp_model_layer.", b.layers
    mtp_tensors = {k: v for k, v in live_tensors(written).items() if k.startswith(mtp_prefix)}
    assert len(mtp_tensors) == 18, sorted(mtp_tensors)  # MLA's five pairs, the experts' two, the shared experts' two

    # Not asked for: left out, listed, and the rest verified.
    out, report = tmp_path / "plain", tmp_path / "plain.json"
    proc = export(adapter_job_bin, base, written.root, out, 4, "--verify-device", "cpu", "--report", report)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(json.loads(report.read_text())["excluded_adapter_tensors"]) == sorted(mtp_tensors)
    assert not any(f".layers.{n}." in k for k in load_file(out / "adapter_model.safetensors"))

    # Asked for: layer n, the same update as the independent mapping.
    out, report = tmp_path / "mtp", tmp_path / "mtp.json"
    proc = export(adapter_job_bin, base, written.root, out, 4, "--verify-device", "cpu", "--report", report,
                  "--include-mtp-layers")
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(report.read_text())["verification"]["checks"]}
    assert checks["mtp_layers_peft_vs_merged_update"]["passed"], checks["mtp_layers_peft_vs_merged_update"]
    adapter = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    expected = hf_adapters({f"decoder.layers.{n}.{k[len(mtp_prefix):]}": v for k, v in mtp_tensors.items()},
                           b.heads, b.heads, b.head_dim, model_type="deepseek_v3", experts=b.experts)
    assert expected and all(path.startswith(f"model.layers.{n}.") for path in expected)
    written_modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter if f".layers.{n}." in k}
    assert written_modules == set(expected), sorted(written_modules ^ set(expected))[:4]
    for path, p in expected.items():
        a, bb = (adapter[f"base_model.model.{path}.lora_{x}.weight"].float() for x in "AB")
        ours, reference = bb @ a, p["B"] @ p["A"]
        assert (ours - reference).abs().max() <= 1e-6 * reference.abs().max(), path
    peft = peft_logits(base, out, prompts_for(b.vocab)[0])  # stock PEFT: the decoder's layers, no MTP module
    assert peft.missing == [] and peft_warnings_beyond_its_moe_conversion(peft.warnings, config["rank_pattern"]) == []

    # A fault only the MTP layer has: kv_b_proj's per-head [k_nope; v] rows swapped. The logits cannot see it.
    planted = with_kv_b_halves_swapped(out, tmp_path / "planted", n, b)
    prompts = prompts_for(b.vocab)
    v = verify(adapter_job_bin, base, planted, tmp_path / "verify-planted", prompts, ckpt=written.root,
               extra=("--include-mtp-layers",))
    failed = [c["name"] for c in v.report["checks"] if not c["passed"]]
    assert v.rc == EXIT_FAILED and failed == ["mtp_layers_peft_vs_merged_update"], (failed, v.stdout)
    v = verify(adapter_job_bin, base, out, tmp_path / "verify-ok", prompts, ckpt=written.root,
               extra=("--include-mtp-layers",))
    assert v.rc == 0 and v.report["passed"], v.stdout

    # merge: the MTP layer folded into the base's model.layers.n tensors, which transformers' MtpModel loads.
    merged = tmp_path / "merged"
    proc = run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint",
                written.root, "--output-hf-path", merged, "--dtype", "fp32", "--verify-device", "cpu",
                "--include-mtp-layers"], check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    base_weights = {}
    for f in base.glob("*.safetensors"):
        base_weights |= load_file(f)
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel
    # transformers names the MTP layer the hub's model has (layer 61); this one's is layer n.
    monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{n}\..*"])
    main = load_merged(merged)
    mtp = MtpModel.from_pretrained(main)  # raises for any MTP weight it misses
    files = {}
    for f in merged.glob("*.safetensors"):
        files |= load_file(f)
    for path, p in expected.items():
        reference = merged_weight(path, base_weights[path + ".weight"], p, "lora", cfg.alpha, cfg.dim)
        candidates = [files[path + ".weight"]]
        if ".experts." not in path:  # transformers holds the routed experts fused
            candidates.append(mtp.get_submodule(path.replace(f"model.layers.{n}.", "layers.0.mtp_block.")).weight)
        for ours in candidates:
            assert ours.dtype == torch.float32 and (ours - reference).abs().max() <= 1e-6 * reference.abs().max(), path
    # A merged model whose MTP layer lacks the update (the base's q_a_proj kept) fails `verify --merged-model`.
    stale = tmp_path / "stale"
    shutil.copytree(merged, stale)
    name = f"model.layers.{n}.self_attn.q_a_proj.weight"
    shard = next(f for f in stale.glob("*.safetensors") if name in load_file(f))
    save_file(load_file(shard) | {name: base_weights[name].float()}, shard, metadata={"format": "pt"})
    v = verify(adapter_job_bin, base, out, tmp_path / "verify-stale", prompts, ckpt=written.root,
               extra=("--include-mtp-layers", "--merged-model", stale))
    failed = [c["name"] for c in v.report["checks"] if not c["passed"]]
    assert v.rc == EXIT_FAILED and "merged_model_weights_within_rounding" in failed, (failed, v.stdout)
