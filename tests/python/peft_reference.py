"""The independent reference an exported adapter is held to: plain PyTorch and stock PEFT, none of the exporter's logic.

* ``merged_reference_logits``: takes Megatron's global adapter tensors in their live layout (stacked
  ``decoder.layers.<sub>`` [L, ...] or per-layer ``decoder.layers.<i>.<sub>``), splits the fused Megatron modules
  itself (linear_qkv rows per query group ``[q heads of g; k_g; v_g]``, linear_fc1 rows ``[gate; up]``), merges
  ``W + alpha/r * B @ A`` (r = dim, A's rows; DoRA: ``m / ||W + sBA||_row * (W + sBA)``) into an fp32 copy of the
  HF base model and runs it.
  DeepSeek-V3: MLA's projections one to one (q_a/q_b or q_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), the shared
  experts' fc1 rows ``[gate; up]``; its MoE layers' experts as below.
  GPT-OSS: its experts' slices of the fused gate_up_proj / down_proj (GPT_OSS_EXPERT), its router mlp.router.
  MoE models (Qwen3-MoE, Mixtral, DeepSeek-V3): expert adapters ([E, ...] per layer, or MB <= 0.5.0's shared ones without the
  expert axis, which every expert gets) merge into each expert's gate/up/down (w1/w3/w2) with r = that A's rows
  (``normalize_moe_lora`` lowers it). transformers 5 fuses the experts into 3-D parameters when loading, so these
  merge into the per-expert tensors on disk, and a merged copy of the model directory is loaded (the loader fuses
  them). The router is never adapted.
* ``peft_logits``: stock ``PeftModel.from_pretrained`` on an adapter directory, recording every warning and
  comparing the file's tensor names with the names PEFT expects, both ways.

For a generated checkpoint the live layout is ``{**written.tensors, **written.true_order}`` (see
tests/fixtures/megatron_checkpoint.py): the stored tensors, with the ones Megatron stores permuted replaced by their
true order. Megatron-Bridge's ``megatron_adapter_tensors.safetensors`` already holds the live tensors.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The 16 tokens of shared/fixtures/megatron-bridge/*/lora/logits.safetensors (byte-level tokenizer, vocab 256).
REFERENCE_TOKENS = [1, 17, 42, 99, 128, 200, 255, 3, 64, 77, 5, 250, 31, 9, 180, 2]

STACK = "decoder.layers."

# Megatron adapter prefix below a layer -> (HF parent module, HF leaf modules, how B's rows and m split)
ADAPTER_MODULES = {
    "self_attention.linear_qkv.adapter.": ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv"),
    "self_attention.linear_qkv.adapter.adapter_q.": ("self_attn", ("q_proj",), None),
    "self_attention.linear_qkv.adapter.adapter_k.": ("self_attn", ("k_proj",), None),
    "self_attention.linear_qkv.adapter.adapter_v.": ("self_attn", ("v_proj",), None),
    "self_attention.linear_proj.adapter.": ("self_attn", ("o_proj",), None),
    "mlp.linear_fc1.adapter.": ("mlp", ("gate_proj", "up_proj"), "halves"),
    "mlp.linear_fc1.adapter.adapter_gate.": ("mlp", ("gate_proj",), None),
    "mlp.linear_fc1.adapter.adapter_up.": ("mlp", ("up_proj",), None),
    "mlp.linear_fc2.adapter.": ("mlp", ("down_proj",), None),
    # DeepSeek-V3: MLA's projections map one to one, shared experts like a dense MLP (Megatron-Bridge
    # models/deepseek/common.py get_common_mapping_list)
    "self_attention.linear_q_down_proj.adapter.": ("self_attn", ("q_a_proj",), None),
    "self_attention.linear_q_up_proj.adapter.": ("self_attn", ("q_b_proj",), None),
    "self_attention.linear_q_proj.adapter.": ("self_attn", ("q_proj",), None),
    "self_attention.linear_kv_down_proj.adapter.": ("self_attn", ("kv_a_proj_with_mqa",), None),
    "self_attention.linear_kv_up_proj.adapter.": ("self_attn", ("kv_b_proj",), None),
    "mlp.shared_experts.linear_fc1.adapter.": ("mlp.shared_experts", ("gate_proj", "up_proj"), "halves"),
    "mlp.shared_experts.linear_fc2.adapter.": ("mlp.shared_experts", ("down_proj",), None),
    # LoRATopKRouter: the router's logits (Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4.5 name it mlp.gate)
    "mlp.router.adapter.": ("mlp", ("gate",), None),
}
# Megatron's expert adapters (TEGroupedMLP): fc1 ([gate; up] rows) and fc2
EXPERT_ADAPTERS = ("mlp.experts.experts.linear_fc1.adapter.", "mlp.experts.experts.linear_fc2.adapter.")
# HF model_type -> (an expert's module below a layer, fc1's gate and up leaves, fc2's leaf): the per-expert names
# save_pretrained writes, as the hub checkpoints have them
EXPERT_MODULES = {
    "qwen3_moe": ("mlp.experts.{}", ("gate_proj", "up_proj"), ("down_proj",)),
    "mixtral": ("block_sparse_moe.experts.{}", ("w1", "w3"), ("w2",)),
    "deepseek_v3": ("mlp.experts.{}", ("gate_proj", "up_proj"), ("down_proj",)),
    "glm4_moe": ("mlp.experts.{}", ("gate_proj", "up_proj"), ("down_proj",)),
    "olmoe": ("mlp.experts.{}", ("gate_proj", "up_proj"), ("down_proj",)),
    # GPT-OSS's checkpoints hold no per-expert tensors: these names stand for slices of the fused ones (GPT_OSS_EXPERT)
    "gpt_oss": ("mlp.experts.{}", ("gate_proj", "up_proj"), ("down_proj",)),
}
# transformers' GptOssExperts: expert e computes gate_up = x @ gate_up_proj[e] with gate = gate_up[..., ::2] and
# up = gate_up[..., 1::2], then x @ down_proj[e]; so gate_proj's [out, in] weight is gate_up_proj[e][:, ::2].T
# (Megatron-Bridge gpt_oss_bridge.py _uninterleave puts Megatron's [gate; up] rows there).
GPT_OSS_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)")
GPT_OSS_COLUMNS = {"gate_proj": slice(0, None, 2), "up_proj": slice(1, None, 2)}
# MoE models whose first layers keep a dense MLP and whose MoE layers add shared experts: leaf names repeat across
# layer kinds, so merged_weight's shape checks stand in for a per-leaf width.
DENSE_FIRST_MOE = ("deepseek_v3", "glm4_moe")


def tokens(vocab: int = 256, n: int = 16, seed: int = 0) -> torch.Tensor:
    """[1, n] token ids: Megatron-Bridge's reference tokens where they fit the vocab, else seeded random ones."""
    if n == len(REFERENCE_TOKENS) and vocab > max(REFERENCE_TOKENS):
        return torch.tensor([REFERENCE_TOKENS])
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def load_base(hf_dir) -> torch.nn.Module:
    """The HF model (its config's class) in fp32 (an exact upcast of bf16 weights), eval mode."""
    from transformers import AutoModelForCausalLM
    # Eager attention: the reference math. SDPA skips Gemma 2's attention soft-capping.
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.no_grad()
def logits_of(model, token_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=token_ids).logits.float()


def hf_config(hf_dir) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def per_layer(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, key below the layer): fp32 tensor} from stacked or per-layer Megatron keys."""
    out = {}
    for key, t in tensors.items():
        if not key.startswith(STACK):
            raise KeyError(f"not a decoder layer key: {key}")
        rest = key[len(STACK):]
        head, _, tail = rest.partition(".")
        if head.isdigit():
            out[(int(head), tail)] = t.float()
        else:
            for i in range(t.shape[0]):
                out[(i, rest)] = t[i].float()
    return out


def split_rows(t: torch.Tensor, how: str | None, nq: int, ng: int, d: int, qkv_split: str) -> list[torch.Tensor]:
    """Rows of a fused Megatron output (B [out, r] or a magnitude [out]) per HF module."""
    if how is None:
        return [t]
    if how == "halves":
        gate, up = t.chunk(2, dim=0)
        return [gate, up]
    assert how == "qkv"
    assert t.shape[0] == (nq + 2 * ng) * d, (t.shape, nq, ng, d)
    if qkv_split == "contiguous":  # deliberately wrong for ng > 1: only for self-checks that tests can fail
        return list(t.split([nq * d, ng * d, ng * d], dim=0))
    hpg = nq // ng
    groups = t.reshape(ng, hpg + 2, d, *t.shape[1:])      # per query group: hpg q heads, one k head, one v head
    q = groups[:, :hpg].reshape(nq * d, *t.shape[1:])
    k = groups[:, hpg].reshape(ng * d, *t.shape[1:])
    v = groups[:, hpg + 1].reshape(ng * d, *t.shape[1:])
    return [q, k, v]


def hf_adapters(tensors: dict[str, torch.Tensor], nq: int, ng: int, head_dim: int, qkv_split: str = "grouped",
                model_type: str | None = None, experts: int | None = None) -> dict[str, dict[str, torch.Tensor | None]]:
    """{HF module path: {"A": [r, in], "B": [out, r], "m": [out] or None}} from Megatron's live tensors.

    Expert adapters give an entry per expert under model_type's names (EXPERT_MODULES): slice e of an [E, ...]
    tensor, or for a legacy shared one (no expert axis) the same tensor for all `experts`."""
    layered = per_layer(tensors)
    out = {}
    for (layer, sub), a in sorted(layered.items()):
        if not sub.endswith("linear_in.weight"):
            continue
        prefix = sub[: -len("linear_in.weight")]
        b = layered[(layer, prefix + "linear_out.weight")]
        if prefix in EXPERT_ADAPTERS:
            if model_type not in EXPERT_MODULES:
                raise KeyError(f"expert adapter {prefix!r} needs an MoE model type {list(EXPERT_MODULES)}, "
                               f"got {model_type!r}")
            parent, fc1, fc2 = EXPERT_MODULES[model_type]
            leaves, how = (fc1, "halves") if prefix == EXPERT_ADAPTERS[0] else (fc2, None)
            per_expert = a.dim() == 3
            n = a.shape[0] if per_expert else experts
            assert n, f"{prefix}: a legacy shared expert adapter needs the number of experts"
            assert not per_expert or b.shape[0] == n == (experts or n), (layer, prefix, a.shape, b.shape, experts)
            for e in range(n):
                ae, be = (a[e], b[e]) if per_expert else (a, b)
                for leaf, bi in zip(leaves, split_rows(be, how, nq, ng, head_dim, qkv_split)):
                    out[f"model.layers.{layer}.{parent.format(e)}.{leaf}"] = {"A": ae, "B": bi, "m": None}
            continue
        if prefix not in ADAPTER_MODULES:
            raise KeyError(f"unknown adapter module {prefix!r}")
        parent, leaves, how = ADAPTER_MODULES[prefix]
        if prefix == "mlp.router.adapter." and model_type == "gpt_oss":
            leaves = ("router",)  # GptOssTopKRouter
        m = layered.get((layer, prefix + "weight_magnitude"))
        bs = split_rows(b, how, nq, ng, head_dim, qkv_split)
        ms = split_rows(m, how, nq, ng, head_dim, qkv_split) if m is not None else [None] * len(leaves)
        for leaf, bi, mi in zip(leaves, bs, ms):
            out[f"model.layers.{layer}.{parent}.{leaf}"] = {"A": a, "B": bi, "m": mi}
    known = {(layer, p + s) for layer, sub in layered for p in (*ADAPTER_MODULES, *EXPERT_ADAPTERS)
             for s in ("linear_in.weight", "linear_out.weight", "weight_magnitude")}
    stray = sorted(k for k in layered if k not in known)
    if stray:
        raise KeyError(f"unexpected Megatron adapter tensors: {stray[:4]}")
    return out


def merged_weight(path: str, w: torch.Tensor, p: dict, kind: str, alpha, dim: int,
                  expected_out: dict[str, int] | None = None) -> torch.Tensor:
    """W + s*B@A in fp32, s = alpha / r with r = A's rows (dim, but for normalize_moe_lora's experts); DoRA then
    rescales each row to the magnitude m."""
    w = w.detach().float()
    a, b, m = p["A"], p["B"], p["m"]
    r = a.shape[0]
    assert r == dim or ".experts." in path, (path, a.shape, dim)
    assert a.shape == (r, w.shape[1]) and b.shape == (w.shape[0], r), (path, a.shape, b.shape, w.shape)
    if expected_out is not None:
        assert w.shape[0] == expected_out[path.rsplit(".", 1)[1]], (path, w.shape)
    merged = w + float(alpha) / r * (b @ a)
    if kind == "dora":
        assert m is not None and m.shape == (w.shape[0],), f"{path}: DoRA needs a magnitude [out]"
        merged = (m / merged.norm(dim=1))[:, None] * merged
    else:
        assert m is None, f"{path}: magnitude in a {kind} checkpoint"
    return merged


def merge_into(model, adapters: dict, kind: str, alpha, dim: int, expected_out: dict[str, int] | None = None) -> None:
    """W <- merged_weight(W) per module of the loaded model."""
    with torch.no_grad():
        for path, p in adapters.items():
            linear = model.get_submodule(path)
            linear.weight.copy_(merged_weight(path, linear.weight, p, kind, alpha, dim, expected_out))


def merged_model(hf_dir, adapters: dict, kind: str, alpha, dim: int, expected_out: dict[str, int] | None = None):
    """The model loaded (as load_base) from a copy of hf_dir whose on-disk weights, in fp32, have the adapters merged
    in: for models whose modules are not their on-disk tensors (transformers 5 fuses MoE experts into 3-D
    parameters when loading, and holds Mixtral's block_sparse_moe as mlp). Every tensor must load, none be left."""
    from transformers import AutoModelForCausalLM
    weights = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        weights.update({k: v.float() for k, v in load_file(path).items()})
    for path, p in adapters.items():
        expert = GPT_OSS_EXPERT.fullmatch(path) if path + ".weight" not in weights else None
        if expert:  # GPT-OSS: no per-expert tensor on disk, only the fused ones
            parent, e, leaf = expert.group(1), int(expert.group(2)), expert.group(3)
            if leaf == "down_proj":
                fused = weights[parent + ".down_proj"]
                fused[e] = merged_weight(path, fused[e].T, p, kind, alpha, dim, expected_out).T
            else:
                fused, columns = weights[parent + ".gate_up_proj"], GPT_OSS_COLUMNS[leaf]
                fused[e][:, columns] = merged_weight(path, fused[e][:, columns].T, p, kind, alpha, dim,
                                                     expected_out).T
            continue
        weights[path + ".weight"] = merged_weight(path, weights[path + ".weight"], p, kind, alpha, dim, expected_out)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(Path(hf_dir) / "config.json", tmp)
        save_file(weights, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        model, info = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager",
                                                           output_loading_info=True)
    assert not any(info.values()), f"merged copy of {hf_dir} loaded with {info}"
    return model.eval()


def merged_reference_logits(hf_dir, megatron_tensors: dict[str, torch.Tensor], kind: str, alpha, dim: int,
                            token_ids: torch.Tensor | None = None, nq: int | None = None, ng: int | None = None,
                            head_dim: int | None = None, ffn: int | None = None,
                            qkv_split: str = "grouped", expert_ffn: int | None = None) -> torch.Tensor:
    """Logits of the HF base with the Megatron adapters merged in fp32 (dims default to the HF config's).

    ``megatron_tensors`` must be the live layout; Megatron's TP is then irrelevant (the stored permutations that
    depend on it are already undone). For an MoE model (its config's model_type in EXPERT_MODULES) the expert
    modules' out sizes are ``expert_ffn`` (default moe_intermediate_size, Mixtral's intermediate_size), and the
    merge goes through the on-disk weights (merged_model)."""
    cfg = hf_config(hf_dir)
    moe = cfg["model_type"] in EXPERT_MODULES
    nq = nq or cfg["num_attention_heads"]
    ng = ng or cfg.get("num_key_value_heads") or nq
    head_dim = head_dim or cfg.get("head_dim") or cfg["hidden_size"] // nq
    if cfg["model_type"] in DENSE_FIRST_MOE or cfg.get("mlp_only_layers"):  # Qwen3-MoE's dense layers too
        adapters = hf_adapters(megatron_tensors, nq, ng, head_dim, qkv_split, cfg["model_type"],
                               cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts"))
        model = merged_model(hf_dir, adapters, kind, alpha, dim)
        return logits_of(model, token_ids if token_ids is not None else tokens(cfg["vocab_size"]))
    ffn = ffn or cfg["intermediate_size"]
    hidden = cfg["hidden_size"]
    expected_out = {"q_proj": nq * head_dim, "k_proj": ng * head_dim, "v_proj": ng * head_dim, "o_proj": hidden,
                    "gate_proj": ffn, "up_proj": ffn, "down_proj": hidden}
    if moe:  # every MLP is an MoE: its expert leaves
        _, fc1, fc2 = EXPERT_MODULES[cfg["model_type"]]
        expert_ffn = expert_ffn or cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        expected_out |= {leaf: expert_ffn for leaf in fc1} | {leaf: hidden for leaf in fc2}
        router = "router" if cfg["model_type"] == "gpt_oss" else "gate"
        expected_out[router] = cfg.get("num_experts") or cfg.get("num_local_experts")
    adapters = hf_adapters(megatron_tensors, nq, ng, head_dim, qkv_split, cfg["model_type"],
                           cfg.get("num_experts") or cfg.get("num_local_experts"))
    if moe:
        model = merged_model(hf_dir, adapters, kind, alpha, dim, expected_out)
    else:
        model = load_base(hf_dir)
        merge_into(model, adapters, kind, alpha, dim, expected_out)
    return logits_of(model, token_ids if token_ids is not None else tokens(cfg["vocab_size"]))


@dataclass
class PeftLoad:
    logits: torch.Tensor
    warnings: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # PEFT expects them, the file lacks them
    unexpected: list[str] = field(default_factory=list)   # in the file, PEFT has no such parameter


def peft_logits(hf_dir, adapter_dir, token_ids: torch.Tensor | None = None) -> PeftLoad:
    """Stock PEFT on the adapter: logits, every warning raised while loading, missing and unexpected keys."""
    from peft import PeftModel, get_peft_model_state_dict
    base = load_base(hf_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    on_disk_tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    # Under transformers 5, PEFT loads per-expert MoE adapters into the fused expert parameters: compare the names
    # its own conversion of the file gives (an identity for every other model).
    from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers
    converted = convert_peft_adapter_state_dict_for_transformers(model, model.peft_config["default"], on_disk_tensors)
    on_disk = {name.replace(".default", "") for name in converted}
    if token_ids is None:
        token_ids = tokens(hf_config(hf_dir)["vocab_size"])
    return PeftLoad(logits=logits_of(model, token_ids),
                    warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
                    missing=sorted(expected - on_disk), unexpected=sorted(on_disk - expected))


def live_tensors(written) -> dict[str, torch.Tensor]:
    """A generated checkpoint's global tensors in the live layout: stored ones, permuted ones in true order."""
    return {**written.tensors, **written.true_order}
