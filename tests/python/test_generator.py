"""The test generators against Megatron-Bridge's real checkpoints (tests/fixtures/megatron_checkpoint.py, tiny_llama.py).

Fed the real global adapter tensors, the Megatron generator must reproduce the real TP1PP1 and TP2PP2 ``.metadata``.
That means the same keys, global shapes, tensor properties and chunks, with every chunk in the same rank file. It
must also reproduce the same common state and run_config values. torch's own DCP loader
(``dcp_to_torch_save``) must give the tensors back bit for bit. The layouts that no real checkpoint here shows
are checked against Megatron's rules: DoRA magnitudes, CanonicalLoRA's swiglu-factory permutation, per-layer keys
and VPP placement (see the generator's docstring and shared/reference/megatron-bridge-export.md §3, §4, Addendum).
"""
import sys

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

REAL_TENSORS = "tp1pp1/lora/megatron_adapter_tensors.safetensors"
FC1_MAG = "decoder.layers.mlp.linear_fc1.adapter.weight_magnitude"


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
