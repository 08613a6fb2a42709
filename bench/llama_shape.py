"""HF Llama base models of the benchmark shapes: config.json, and with --weights random bf16 weights.

Shapes: smoke (tiny, to try the scripts), 1b (Llama-3.2-1B: 16 layers, hidden 2048, 32 heads of 64, 8 KV heads, ffn 8192,
tied embeddings), 8b (Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, ffn 14336) and 70b (80 layers, hidden 8192,
64 heads, 8 KV heads, ffn 28672), vocab 128256. The weights are what a real checkpoint holds in names, shapes and
dtype (sharded model-0000i-of-0000n.safetensors with an index), drawn on the GPU when there is one (about 16 GB for
8b): normal with std 0.02 for matrices, RMSNorm gains 1. Nothing about them is meaningful but their bytes.

    python bench/llama_shape.py --shape 8b --out DIR [--weights] [--layers N]
    python bench/llama_shape.py --shape 8b --checkpoint-args   # the megatron_checkpoint.py dims of the shape
"""
import argparse
import json
from pathlib import Path

SHAPES = {
    "1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, rank=16, alpha=32, tied=True),
    "8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, rank=16, alpha=32),
    "70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, rank=64, alpha=128),
    # for trying the benchmark scripts out on a small machine
    "smoke": dict(layers=4, hidden=256, heads=8, kv_heads=4, head_dim=32, ffn=512, rank=8, alpha=16),
}
VOCAB = 128256
SHARD_BYTES = 5 << 30


def checkpoint_args(s: dict) -> list[str]:
    return ["--layers", s["layers"], "--hidden", s["hidden"], "--heads", s["heads"], "--query-groups", s["kv_heads"],
            "--head-dim", s["head_dim"], "--ffn", s["ffn"], "--dim", s["rank"], "--alpha", s["alpha"]]


def write_config(s: dict, out: Path) -> None:
    import transformers
    transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        bos_token_id=1, eos_token_id=2, dtype="bfloat16", architectures=["LlamaForCausalLM"],
        tie_word_embeddings=s.get("tied", False)).save_pretrained(out)


def tensor_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, f, q, kv = s["hidden"], s["ffn"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,)}
    if not s.get("tied", False):
        shapes["lm_head.weight"] = (VOCAB, h)
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes


def write_weights(s: dict, out: Path, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape in tensor_shapes(s).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        if current and size + t.numel() * 2 > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + t.numel() * 2
    shards.append(current)
    index = {"metadata": {"total_size": sum(t.numel() * 2 for sh in shards for t in sh.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        index["weight_map"] |= {name: file for name in shard}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--weights", action="store_true")
    ap.add_argument("--checkpoint-args", action="store_true")
    ap.add_argument("--layers", type=int, help="fewer (or more) layers than the shape has")
    a = ap.parse_args()
    s = SHAPES[a.shape] | ({"layers": a.layers} if a.layers else {})
    if a.checkpoint_args:
        print(" ".join(map(str, checkpoint_args(s))))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    write_config(s, a.out)
    if a.weights:
        write_weights(s, a.out)


if __name__ == "__main__":
    main()
