"""The test generators against Megatron-Bridge's real checkpoints (tests/fixtures/megatron_checkpoint.py, tiny_llama.py).

Fed the real global adapter tensors, the Megatron generator must reproduce the real TP1PP1 and TP2PP2 ``.metadata``.
That means the same keys, global shapes, tensor properties and chunks, with every chunk in the same rank file. It
must also reproduce the same common state and run_config values. torch's own DCP loader
(``dcp_to_torch_save``) must give the tensors back bit for bit. The layouts that no real checkpoint here shows
are checked against Megatron's rules: DoRA magnitudes, CanonicalLoRA's swiglu-factory permutation, per-layer keys
and VPP placement (see the generator's docstring and shared/reference/megatron-bridge-export.md §3, §4, Addendum).
So are MoE expert adapters (no real MoE checkpoint exists here): which simulated rank writes which expert slots and
ETP shards, for shared, per-expert and legacy shared adapters and normalize_moe_lora's ranks, read back with torch's
DCP reader; and the tiny Qwen3-MoE / Mixtral bases with the merged reference on them.
"""
import sys
from itertools import product

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

import megatron_checkpoint as mc
import tiny_llama
from conftest import run
from peft_reference import live_tensors, load_base, logits_of, merged_reference_logits, tokens

REAL_TENSORS = "tp1pp1/lora/megatron_adapter_tensors.safetensors"
FC1_MAG = "decoder.layers.mlp.linear_fc1.adapter.weight_magnitude"
MOE = "decoder.layers.mlp.experts.experts."
FC1_A, FC1_B, FC2_A, FC2_B = (f"{MOE}linear_fc{n}.adapter.linear_{s}.weight" for n, s in
                              ((1, "in"), (1, "out"), (2, "in"), (2, "out")))
QKV_A = "decoder.layers.self_attention.linear_qkv.adapter.linear_in.weight"
L, E, H, F = 4, 4, 64, 32   # the MoE checkpoints' layers, experts, hidden and expert ffn


def layout(iter_dir):
    """Per DCP key: (global shape, tensor properties, {(offsets, sizes, rank file)}), or "bytes"."""
    md = FileSystemReader(iter_dir).read_metadata()
    return {key: (tuple(v.size), v.properties, {(tuple(c.offsets), tuple(c.sizes),
                  md.storage_data[MetadataIndex(key, c.offsets)].relative_path) for c in v.chunks})
            if isinstance(v, TensorStorageMetadata) else "bytes" for key, v in md.state_dict_metadata.items()}


def load_all(iter_dir, tmp_path):
    """Everything in the checkpoint, assembled by torch's own DCP loader (tensors global, byte items unpickled)."""
    dcp_to_torch_save(iter_dir, tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=False)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def moe_checkpoint(tmp_path, **kw) -> tuple[mc.Written, dict]:
    """A 4-layer, 4-expert (F 32) LoRA checkpoint and its layout; torch's DCP loader must give back exactly
    Written.tensors, which expected_megatron_tensors.safetensors holds too."""
    written = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "ckpt", experts=E, expert_ffn=F, **kw))
    loaded = load_all(written.iter_dir, tmp_path)
    expected = load_file(written.root / "expected_megatron_tensors.safetensors")
    assert written.tensors.keys() == expected.keys() == {k for k in loaded if "/" not in k}
    for key, tensor in written.tensors.items():
        assert same_bits(loaded[key], tensor) and same_bits(expected[key], tensor), key
    return written, layout(written.iter_dir)


def byte_keys(lay) -> set[str]:
    return {k for k, v in lay.items() if v == "bytes"}


@pytest.mark.parametrize("par", ["tp1pp1", "tp2pp2"])
def test_reproduces_real_checkpoint(par, mb_fixtures, repo_root, tmp_path):
    real_dir = mb_fixtures / par / "lora/megatron_ckpt"
    real_iter = real_dir / "iter_0000001"
    out = tmp_path / "ckpt"
    # TP2PP2 through the CLI, TP1PP1 through the library.
    if par == "tp2pp2":
        run([sys.executable, repo_root / "tests/fixtures/megatron_checkpoint.py", "--out", out, "--tp", 2, "--pp", 2,
             "--tensors-from", mb_fixtures / REAL_TENSORS, "--hf-model-id", "/tmp/mbref/hf_base"])
    else:
        mc.write_checkpoint(mc.CheckpointConfig(out=out, tensors_from=mb_fixtures / REAL_TENSORS,
                                                hf_model_id="/tmp/mbref/hf_base"))
    ours = out / "iter_0000001"

    assert layout(ours) == layout(real_iter)
    md = FileSystemReader(ours).read_metadata()  # Megatron's .metadata: no planner data, index hints or Paths
    assert md.planner_data is None and {k.index for k in md.storage_data} == {None}
    assert isinstance(md.storage_meta.checkpoint_id, str)

    real_tensors = load_file(mb_fixtures / REAL_TENSORS)
    loaded = load_all(ours, tmp_path)
    assert loaded["common_state/shard_0_1"] == load_all(real_iter, tmp_path)["common_state/shard_0_1"]
    expected = load_file(out / "expected_megatron_tensors.safetensors")
    assert real_tensors.keys() == expected.keys() == {k for k in loaded if "/" not in k}
    for key, tensor in real_tensors.items():
        assert same_bits(loaded[key], tensor) and same_bits(expected[key], tensor), key

    assert (out / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert (ours / "metadata.json").read_text() == (real_iter / "metadata.json").read_text()
    real_cfg = yaml.safe_load((real_iter / "run_config.yaml").read_text())
    our_cfg = yaml.safe_load((ours / "run_config.yaml").read_text())
    for section in ("peft", "model"):
        assert our_cfg[section] == {k: real_cfg[section][k] for k in our_cfg[section]}, section


def test_dora_tp2_magnitudes(mb_fixtures, tmp_path):
    hf_base = mb_fixtures / "hf_base"
    cfg = mc.CheckpointConfig(out=tmp_path / "ckpt", tp=2, kind="dora", base_model=hf_base)
    written = mc.write_checkpoint(cfg)
    lay, loaded = layout(written.iter_dir), load_all(written.iter_dir, tmp_path)
    L, F, s = cfg.num_layers, cfg.ffn, cfg.alpha / cfg.dim

    # qkv/fc1 magnitudes TP-sharded along out; proj/fc2 replicated, written by TP rank 0 only.
    mags = {m: lay[f"decoder.layers.{m}.adapter.weight_magnitude"] for m in
            ("self_attention.linear_qkv", "mlp.linear_fc1", "self_attention.linear_proj", "mlp.linear_fc2")}
    assert mags["self_attention.linear_qkv"][0] == (L, 128) and mags["mlp.linear_fc1"][0] == (L, 2 * F)
    assert {c[1:] for c in mags["mlp.linear_fc1"][2]} == {((1, F), "__0_0.distcp"), ((1, F), "__1_0.distcp")}
    for m in ("self_attention.linear_proj", "mlp.linear_fc2"):
        assert mags[m][2] == {((i, 0), (1, 64), "__0_0.distcp") for i in range(L)}

    # The fc1 magnitude is stored [g0; u0; g1; u1]; the true order is [gate; up].
    true = load_file(cfg.out / "expected_dora_true_order.safetensors")[FC1_MAG + ".true_order"]
    gate, up = true[:, :F], true[:, F:]
    h = F // 2
    interleaved = torch.cat([gate[:, :h], up[:, :h], gate[:, h:], up[:, h:]], dim=1)
    assert same_bits(loaded[FC1_MAG], interleaved) and same_bits(written.tensors[FC1_MAG], interleaved)
    assert not torch.equal(interleaved, true)

    # True magnitudes = row norms of W0 + s·B@A, computed here per HF module, times (1 ± a few %).
    hf, t = load_file(hf_base / "model.safetensors"), written.tensors
    for i in range(L):
        def norms(module, b, adapter):
            w = hf[f"model.layers.{i}.{module}.weight"].float()
            a = t[f"decoder.layers.{adapter}.adapter.linear_in.weight"][i].float()
            return (w + s * b.float() @ a).norm(dim=1)
        # fused qkv rows per query group: 2 q heads, k, v (16 rows each)
        b = t["decoder.layers.self_attention.linear_qkv.adapter.linear_out.weight"][i].view(2, 4, 16, 8)
        per_group = [norms(f"self_attn.{p}_proj", b[:, rows].reshape(-1, 8), "self_attention.linear_qkv").view(2, -1)
                     for p, rows in (("q", slice(0, 2)), ("k", slice(2, 3)), ("v", slice(3, 4)))]
        qkv_ratio = t["decoder.layers.self_attention.linear_qkv.adapter.weight_magnitude"][i].float() / torch.cat(
            per_group, dim=1).flatten()
        b = t["decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"][i]
        fc1_ratio = true[i].float() / torch.cat([norms("mlp.gate_proj", b[:F], "mlp.linear_fc1"),
                                                 norms("mlp.up_proj", b[F:], "mlp.linear_fc1")])
        for ratio in (qkv_ratio, fc1_ratio):
            assert (ratio - 1).abs().max() < 0.1, i

    peft = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())["peft"]
    assert peft["_target_"] == "megatron.bridge.peft.dora.DoRA" and "share_expert_adapters" not in peft


def test_canonical_lora_tp2(tmp_path):
    cfg = mc.CheckpointConfig(out=tmp_path / "ckpt", tp=2, kind="canonical_lora")
    written = mc.write_checkpoint(cfg)
    lay, loaded = layout(written.iter_dir), load_all(written.iter_dir, tmp_path)
    F, qkv, fc1 = cfg.ffn, "decoder.layers.self_attention.linear_qkv.adapter.", "decoder.layers.mlp.linear_fc1.adapter."
    assert {k for k in lay if "adapter_" in k} == {f"{qkv}adapter_{p}.linear_{s}.weight" for p in "qkv" for s in
                                                 ("in", "out")} | {f"{fc1}adapter_{p}.linear_{s}.weight" for p in
                                                                   ("gate", "up") for s in ("in", "out")}
    assert lay[qkv + "adapter_q.linear_out.weight"][0] == (4, 64, 8)
    assert lay[qkv + "adapter_k.linear_in.weight"][2] == {((i, t * 4, 0), (1, 4, 64), f"__{t}_0.distcp")
                                                         for i in range(4) for t in range(2)}
    for part in ("gate", "up"):
        key = f"{fc1}adapter_{part}.linear_out.weight"
        # swiglu factory: rank t's live rows (block t of the true matrix) halved into chunks t and t+2 of 4.
        assert lay[key][2] == {((i, c * 32, 0), (1, 32, 8), f"__{c % 2}_0.distcp") for i in range(4) for c in range(4)}
        true = written.true_order[key]
        assert same_bits(load_file(cfg.out / "expected_canonical_lora_true_order.safetensors")[key + ".true_order"],
                         true)
        stored = loaded[key]
        for t in range(2):
            assert same_bits(torch.cat([stored[:, t * 32:(t + 1) * 32], stored[:, (t + 2) * 32:(t + 3) * 32]], 1),
                             true[:, t * 64:(t + 1) * 64])
        assert not torch.equal(stored, true)
    peft = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())["peft"]
    assert peft["target_modules"] == list(mc.CANONICAL_TARGETS)
    assert peft["canonical_mapping"]["linear_fc1"] == {"linear_fc1_up", "linear_fc1_gate"}


def test_per_layer_keys_vpp_and_determinism(tmp_path):
    # VPP 2 over PP 2 with 8 layers: chunks of 2 layers, stage 0 owns layers 0, 1, 4, 5.
    stacked = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "vpp", pp=2, vpp=2, num_layers=8))
    chunks = layout(stacked.iter_dir)["decoder.layers.mlp.linear_fc2.adapter.linear_in.weight"][2]
    assert chunks == {((i, 0, 0), (1, 8, 128), f"__{i // 2 % 2}_0.distcp") for i in range(8)}
    model = yaml.safe_load((stacked.iter_dir / "run_config.yaml").read_text())["model"]
    assert model["virtual_pipeline_model_parallel_size"] == 2 and model["pipeline_model_parallel_size"] == 2

    # Per-layer keys at TP2 PP2 VPP2, fp32: layer i is on stage i // 2 % 2, in ranks 2·stage and 2·stage + 1.
    cfg = mc.CheckpointConfig(out=tmp_path / "per_layer", tp=2, pp=2, vpp=2, num_layers=8, per_layer_keys=True,
                              dtype="fp32")
    written = mc.write_checkpoint(cfg)
    lay, loaded = layout(written.iter_dir), load_all(written.iter_dir, tmp_path)
    assert {k for k in lay if k.startswith("decoder.")} == {
        f"decoder.layers.{i}.{p.name}" for i in range(8) for p in mc.adapter_params(cfg)}
    assert lay["decoder.layers.5.self_attention.linear_proj.adapter.linear_in.weight"] == (
        (8, 64), lay["decoder.layers.5.self_attention.linear_proj.adapter.linear_in.weight"][1],
        {((0, 0), (8, 32), "__0_0.distcp"), ((0, 32), (8, 32), "__1_0.distcp")})
    assert {c for c in lay["decoder.layers.2.mlp.linear_fc1.adapter.linear_out.weight"][2]} == {
        ((0, 0), (64, 8), "__2_0.distcp"), ((64, 0), (64, 8), "__3_0.distcp"),
        ((128, 0), (64, 8), "__2_0.distcp"), ((192, 0), (64, 8), "__3_0.distcp")}
    for p in mc.adapter_params(cfg):
        for i in range(8):
            assert same_bits(loaded[f"decoder.layers.{i}.{p.name}"], written.tensors[mc.STACK + p.name][i])

    # Values depend on the seed and key only, not on TP, PP or dtype.
    for key, tensor in stacked.tensors.items():
        assert torch.equal(tensor, written.tensors[key].to(tensor.dtype)), key


def test_tiny_llama_matches_real_base(mb_fixtures, tmp_path):
    real = mb_fixtures / "hf_base"
    ours = tiny_llama.build_tiny_llama(tiny_llama.TinyLlamaConfig(), tmp_path / "base")
    assert yaml.safe_load((ours / "config.json").read_text()) == yaml.safe_load((real / "config.json").read_text())
    mine, theirs = load_file(ours / "model.safetensors"), load_file(real / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in mine.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}

    tied = tiny_llama.build_tiny_llama(tiny_llama.TinyLlamaConfig(tie_word_embeddings=True, rope_scaling="llama3",
                                                                  dtype="fp32", seed=1), tmp_path / "tied")
    weights = load_file(tied / "model.safetensors")
    assert "lm_head.weight" not in weights and weights["model.norm.weight"].dtype == torch.float32
    assert yaml.safe_load((tied / "config.json").read_text())["rope_parameters"]["rope_type"] == "llama3"


# ---------------------------------------------------------------------------------------------------------------
# MoE expert adapters


def test_moe_shared_ep2_tp2(tmp_path):
    # A stage of max(TP 2, EP 2 x ETP 1) = 2 ranks: attention TP rank t and expert EP rank t are rank t.
    written, lay = moe_checkpoint(tmp_path, tp=2, ep=2, etp=1)
    r = 8
    shapes = {FC1_A: (L, E, r, H), FC1_B: (L, E, 2 * F, r), FC2_A: (L, E, r, F), FC2_B: (L, E, H, r)}
    assert {k for k in lay if k.startswith("decoder.") and ".self_attention." not in k} == set(shapes)
    assert {k: lay[k][0] for k in shapes} == shapes
    # One chunk per expert slot (ETP 1: whole matrices, fc1's B in its two swiglu halves); EP rank ep writes slots
    # 2ep and 2ep+1.
    file = {e: f"__{e // 2}_0.distcp" for e in range(E)}
    assert lay[FC1_A][2] == {((i, e, 0, 0), (1, 1, r, H), file[e]) for i, e in product(range(L), range(E))}
    assert lay[FC1_B][2] == {((i, e, h * F, 0), (1, 1, F, r), file[e])
                             for i, e, h in product(range(L), range(E), range(2))}
    assert lay[FC2_A][2] == {((i, e, 0, 0), (1, 1, r, F), file[e]) for i, e in product(range(L), range(E))}
    assert lay[FC2_B][2] == {((i, e, 0, 0), (1, 1, H, r), file[e]) for i, e in product(range(L), range(E))}
    assert lay[QKV_A][2] == {((i, t * 4, 0), (1, 4, H), f"__{t}_0.distcp") for i, t in product(range(L), range(2))}
    # EP > 1: the RNG state is sharded by (PP, TP, DP), one item per rank.
    assert byte_keys(lay) == {"common_state/shard_0_1", "rng_state/shard_0.0.0_1.2.1", "rng_state/shard_0.1.0_1.2.1"}
    for key in shapes:  # a shared adapter: the same in every slot
        t = written.tensors[key]
        assert all(torch.equal(t[:, e], t[:, 0]) for e in range(E)), key

    run_cfg = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())
    model, peft = run_cfg["model"], run_cfg["peft"]
    assert {k: model[k] for k in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_grouped_gemm",
                                  "moe_layer_freq", "expert_model_parallel_size", "expert_tensor_parallel_size",
                                  "tensor_model_parallel_size")} == {
        "num_moe_experts": E, "moe_router_topk": 2, "moe_ffn_hidden_size": F, "moe_grouped_gemm": True,
        "moe_layer_freq": 1, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
        "tensor_model_parallel_size": 2}
    assert peft["share_expert_adapters"] is True and peft["normalize_moe_lora"] is False
    assert {"decoder.layers.0.mlp.experts.linear_fc1.adapter.linear_in.weight",
            "decoder.layers.0.mlp.experts.linear_fc2.adapter.linear_out.weight"} <= peft["params_to_save"]
    assert not any(".experts.experts." in k for k in peft["params_to_save"])


def test_moe_per_expert_ep2_etp2_tp2_pp2(tmp_path):
    # A stage of max(TP 2, EP 2 x ETP 2) = 4 ranks, world 8: expert (ep, etp) of stage p is rank 4p + 2ep + etp;
    # the attention's TP ranks are ranks 4p and 4p + 1.
    written, lay = moe_checkpoint(tmp_path, tp=2, pp=2, ep=2, etp=2, share_expert_adapters=False)
    r = 8

    def rank(i, ep, t):  # layer i is on stage i // 2
        return f"__{i // 2 * 4 + ep * 2 + t}_0.distcp"

    grid = list(product(range(L), range(2), range(2)))
    # One chunk per (EP rank, ETP rank[, swiglu half]) spanning the EP rank's 2 experts.
    assert lay[FC1_A][2] == {((i, 2 * ep, 4 * t, 0), (1, 2, 4, H), rank(i, ep, t)) for i, ep, t in grid}
    # swiglu factory over 2·ETP: ETP rank t's rows [gate_t; up_t] are chunks t and t + 2 of 4
    assert lay[FC1_B][2] == {((i, 2 * ep, 16 * c, 0), (1, 2, 16, r), rank(i, ep, c % 2))
                             for i, ep, c in product(range(L), range(2), range(4))}
    assert lay[FC2_A][2] == {((i, 2 * ep, 0, 16 * t), (1, 2, r, 16), rank(i, ep, t)) for i, ep, t in grid}
    assert lay[FC2_B][2] == {((i, 2 * ep, 32 * t, 0), (1, 2, 32, r), rank(i, ep, t)) for i, ep, t in grid}
    assert lay[QKV_A][2] == {((i, t * 4, 0), (1, 4, H), f"__{i // 2 * 4 + t}_0.distcp")
                             for i, t in product(range(L), range(2))}
    assert sorted(f.name for f in written.iter_dir.glob("*.distcp")) == [f"__{n}_0.distcp" for n in range(8)]
    assert byte_keys(lay) == {"common_state/shard_0_1"} | {
        f"rng_state/shard_{p}.{t}.{d}_2.2.2" for p, t, d in product(range(2), range(2), range(2))}
    # ETP rank t's local fc1 B rows [gate_t; up_t] go through the swiglu factory: the stored global tensor is the
    # true [gate; up], not permuted
    assert written.true_order == {}
    b = written.tensors[FC1_B]
    assert not torch.equal(b[:, 0], b[:, 1]) and not torch.equal(b[:, 0], b[:, 2])  # every expert its own
    model = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())["model"]
    assert model["expert_tensor_parallel_size"] == 2 and model["expert_model_parallel_size"] == 2

    # Per-layer keys (a non-homogeneous stack): [E, ...] without the layer axis, the same chunks.
    per_layer = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "per_layer", experts=E, expert_ffn=F, ep=2,
                                                        share_expert_adapters=False, per_layer_keys=True))
    lay, loaded = layout(per_layer.iter_dir), load_all(per_layer.iter_dir, tmp_path)
    key = "decoder.layers.3.mlp.experts.experts.linear_fc2.adapter.linear_in.weight"
    assert lay[key][0] == (E, r, F) and lay[key][2] == {((2 * ep, 0, 0), (2, r, F), f"__{ep}_0.distcp")
                                                        for ep in range(2)}
    for p in mc.adapter_params(mc.CheckpointConfig(out=tmp_path, experts=E, expert_ffn=F, share_expert_adapters=False)):
        for i in range(L):
            assert same_bits(loaded[f"decoder.layers.{i}.{p.name}"], per_layer.tensors[mc.STACK + p.name][i])
    # values depend on the seed and key only
    for key, tensor in per_layer.tensors.items():
        assert torch.equal(tensor, written.tensors[key]), key


def test_moe_legacy_shared(tmp_path):
    # MB <= 0.5.0: no expert axis, written by EP rank 0 only. TP 2, EP 2, ETP = TP: a stage of 4 ranks, where ranks
    # 2 and 3 (EP rank 1) write no tensor but still join the save (their RNG state).
    written, lay = moe_checkpoint(tmp_path, tp=2, ep=2, legacy_shared_experts=True)
    r = 8
    assert {k: lay[k][0] for k in (FC1_A, FC1_B, FC2_A, FC2_B)} == {
        FC1_A: (L, r, H), FC1_B: (L, 2 * F, r), FC2_A: (L, r, F), FC2_B: (L, H, r)}
    grid = list(product(range(L), range(2)))
    assert lay[FC1_A][2] == {((i, 4 * t, 0), (1, 4, H), f"__{t}_0.distcp") for i, t in grid}
    assert lay[FC1_B][2] == {((i, 16 * c, 0), (1, 16, r), f"__{c % 2}_0.distcp")
                             for i, c in product(range(L), range(4))}
    assert lay[FC2_A][2] == {((i, 0, 16 * t), (1, r, 16), f"__{t}_0.distcp") for i, t in grid}
    assert lay[FC2_B][2] == {((i, 32 * t, 0), (1, 32, r), f"__{t}_0.distcp") for i, t in grid}
    assert byte_keys(lay) == {"common_state/shard_0_1"} | {
        f"rng_state/shard_0.{t}.{d}_1.2.2" for t, d in product(range(2), range(2))}
    assert sorted(f.name for f in written.iter_dir.glob("*.distcp")) == [f"__{n}_0.distcp" for n in range(4)]
    # The same values as the synchronised shared adapter in every expert slot.
    shared_cfg = mc.CheckpointConfig(out=tmp_path, experts=E, expert_ffn=F)
    shared = mc.true_tensors(shared_cfg, mc.adapter_params(shared_cfg))
    for key in (FC1_A, FC1_B, FC2_A, FC2_B):
        assert all(torch.equal(shared[key][:, e], written.tensors[key]) for e in range(E)), key
    peft = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())["peft"]
    assert peft["share_expert_adapters"] is True


def test_moe_normalized_ranks_etp2(tmp_path):
    # normalize_moe_lora: rank dim // topk = 3; fc1 (column-parallel) rounded up to a multiple of ETP 2, fc2 not.
    # TP 1, EP 1, ETP 2: a stage of 2 ranks; rank 1 holds ETP rank 1's shards, no attention and, as a DP replica
    # of TP rank 0 without EP, no RNG state.
    written, lay = moe_checkpoint(tmp_path, dim=6, alpha=12, normalize_moe_lora=True, etp=2)
    assert {k: lay[k][0] for k in (FC1_A, FC1_B, FC2_A, FC2_B)} == {
        FC1_A: (L, E, 4, H), FC1_B: (L, E, 2 * F, 4), FC2_A: (L, E, 3, F), FC2_B: (L, E, H, 3)}
    assert lay[QKV_A][0] == (L, 6, H) and {c[2] for c in lay[QKV_A][2]} == {"__0_0.distcp"}
    grid = list(product(range(L), range(E), range(2)))
    assert lay[FC1_A][2] == {((i, e, 2 * t, 0), (1, 1, 2, H), f"__{t}_0.distcp") for i, e, t in grid}
    assert lay[FC1_B][2] == {((i, e, 16 * c, 0), (1, 1, 16, 4), f"__{c % 2}_0.distcp")
                             for i, e, c in product(range(L), range(E), range(4))}
    assert lay[FC2_A][2] == {((i, e, 0, 16 * t), (1, 1, 3, 16), f"__{t}_0.distcp") for i, e, t in grid}
    assert lay[FC2_B][2] == {((i, e, 32 * t, 0), (1, 1, 32, 3), f"__{t}_0.distcp") for i, e, t in grid}
    assert byte_keys(lay) == {"common_state/shard_0_1", "rng_state/shard_0.0_1.1"}
    run_cfg = yaml.safe_load((written.iter_dir / "run_config.yaml").read_text())
    assert run_cfg["peft"]["normalize_moe_lora"] is True and run_cfg["peft"]["dim"] == 6
    assert run_cfg["model"]["expert_tensor_parallel_size"] == 2 and run_cfg["model"]["tensor_model_parallel_size"] == 1


@pytest.mark.parametrize("kw,message", [
    ({"kind": "dora"}, "dora on experts"),
    ({"kind": "canonical_lora"}, "canonical_lora on experts"),
    ({"normalize_moe_lora": True, "dim": 6, "topk": 4}, "divisible by topk"),
    ({"tp": 2, "ep": 4, "etp": 1, "experts": 8, "query_groups": 4}, None),  # S = 4: valid
    ({"tp": 2, "ep": 3, "etp": 1, "experts": 6}, "whole TP groups"),
    ({"ep": 3}, "experts % ep"),
    ({"share_expert_adapters": False, "legacy_shared_experts": True}, "legacy_shared_experts"),
    ({"experts": 0, "ep": 2}, "need experts"),
])
def test_moe_config_checks(tmp_path, kw, message):
    cfg = mc.CheckpointConfig(out=tmp_path, **({"experts": E, "expert_ffn": F} | kw))
    if message is None:
        mc._validate(cfg, mc.adapter_params(cfg))
        return
    with pytest.raises(ValueError, match=message):
        mc._validate(cfg, mc.adapter_params(cfg))


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_tiny_moe_bases_and_merged_reference(arch, tmp_path):
    t = tiny_llama.TinyLlamaConfig(architecture=arch)
    base = tiny_llama.build_tiny_llama(t, tmp_path / "base")
    weights = load_file(base / "model.safetensors")
    block, gate, up, down = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                             "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}[arch]
    # save_pretrained writes the hub's per-expert keys (transformers 5 holds them fused)
    assert {k for k in weights if k.startswith("model.layers.0.") and ".experts." in k} == {
        f"model.layers.0.{block}.experts.{e}.{m}.weight" for e in range(E) for m in (gate, up, down)}
    assert weights[f"model.layers.0.{block}.experts.3.{gate}.weight"].shape == (t.expert_ffn, t.hidden)
    router = weights[f"model.layers.0.{block}.gate.weight"]
    assert router.shape == (E, t.hidden) and router.float().std() > 0.3  # a decisive top-k

    # TP 2, EP 2: the merged reference runs, and the expert adapters alone change the logits.
    cfg = dict(experts=t.experts, expert_ffn=t.expert_ffn, topk=t.experts_per_token, ffn=t.ffn, tp=2, ep=2, etp=1)
    shared = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "shared", **cfg))
    legacy = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "legacy", legacy_shared_experts=True, **cfg))
    ids = tokens(t.vocab)
    base_logits = logits_of(load_base(base), ids)
    merged = {name: merged_reference_logits(base, tensors, "lora", 16, 8, ids) for name, tensors in (
        ("shared", live_tensors(shared)), ("legacy", live_tensors(legacy)),
        ("experts", {k: v for k, v in live_tensors(shared).items() if k.startswith(MOE)}))}
    for name in ("shared", "experts"):
        assert (merged[name] - base_logits).abs().max() > 0.05, name
    assert torch.equal(merged["shared"], merged["legacy"])  # a legacy adapter applies to every expert

    # DoRA on an MoE's attention only: magnitudes from the base's weights (which have no dense MLP)
    dora = mc.CheckpointConfig(out=tmp_path, kind="dora", targets=("linear_qkv", "linear_proj"), base_model=base,
                               **cfg)
    mags = mc.true_tensors(dora, mc.adapter_params(dora))
    assert mags["decoder.layers.self_attention.linear_qkv.adapter.weight_magnitude"].shape == (L, 128)


@pytest.mark.parametrize("kw", [dict(experts=E, expert_ffn=F, tp=2, pp=2, ep=2, share_expert_adapters=False,
                                     per_layer_keys=True, first_dense_layers=1),
                                dict(kind="dora", tp=2)],
                         ids=["moe-per-expert-tp2pp2ep2", "dora-tp2"])
def test_lean_writes_the_same_checkpoint(kw, tmp_path):
    """--lean (keep_tensors=False), which the 256-expert bench needs to fit, writes the same files as the default: the
    rank files byte for byte, the same .metadata but for its random save_id, and torch's DCP loader reads the same
    tensors; Written then holds no tensors, and using them is an error, not an empty dict."""
    kept = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "kept", write_expected=False, **kw))
    lean = mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "lean", write_expected=False, keep_tensors=False,
                                                   **kw))
    files = sorted(p.name for p in kept.iter_dir.iterdir())
    assert files == sorted(p.name for p in lean.iter_dir.iterdir()) and len(files) > 4
    for name in files:
        if name != ".metadata":
            assert (kept.iter_dir / name).read_bytes() == (lean.iter_dir / name).read_bytes(), name
    assert layout(kept.iter_dir) == layout(lean.iter_dir)
    a, b = load_all(kept.iter_dir, kept.root), load_all(lean.iter_dir, lean.root)
    tensors = [k for k in a if "/" not in k]
    assert a.keys() == b.keys() and tensors and all(same_bits(a[k], b[k]) for k in tensors)
    for use in (lambda t: t[next(iter(kept.tensors))], len, lambda t: t.items(), lambda t: t == {}):
        with pytest.raises(RuntimeError, match="keep_tensors=False"):
            use(lean.tensors)
    with pytest.raises(ValueError, match="--no-expected"):
        mc.write_checkpoint(mc.CheckpointConfig(out=tmp_path / "bad", keep_tensors=False, **kw))


@pytest.mark.parametrize("n,piece", [(1000, 48), (4096, 64), (17, 16), (7, 16), (100_003, 4096)])
def test_randn_in_pieces_gives_one_draws_bits(n, piece):
    """The lean generator draws a parameter a piece at a time; the values must be those of one torch.randn draw
    (torch's CPU normal fill transforms uniforms 16 at a time), or the fixtures would change with the piece size."""
    whole = (torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    pieces = mc._randn((n,), torch.Generator().manual_seed(5), 0.05, torch.bfloat16, piece=piece)
    assert same_bits(whole, pieces)
