"""The Python export pipeline the benchmark holds adapter_job against: what Megatron-Bridge's export_adapter.py does
to the adapter tensors, minus building the model (so a lower bound on its time).

It loads every adapter tensor of the checkpoint with torch.distributed.checkpoint (one process, no process group),
converts Megatron's fused layouts to PEFT's (QKV split per query group, fc1 split into gate and up; linear_in shared
by the parts), and writes adapter_model.safetensors with safetensors' save_file plus adapter_config.json.
LoRA with the fused targets and stacked keys, which is what the benchmark checkpoints hold.

    python bench/reference_export.py --hf-model DIR --checkpoint RUN_OR_ITER_DIR --out DIR

Prints one JSON line: seconds for imports, load, convert, save, and the process's peak RSS.
"""
import time

start = time.perf_counter()
import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

imported = time.perf_counter()
STACK = "decoder.layers."
HF = "base_model.model.model.layers.{}."


def iter_dir_of(path: Path) -> Path:
    latest = path / "latest_checkpointed_iteration.txt"
    return path / f"iter_{int(latest.read_text()):07d}" if latest.exists() else path


def load_adapters(iter_dir: Path) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(iter_dir))
    meta = reader.read_metadata()
    state = {key: torch.empty(m.size, dtype=m.properties.dtype) for key, m in meta.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata) and ".adapter." in key}
    dcp.load(state, storage_reader=reader)
    return state


def convert(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q_rows = heads // groups * head_dim
    out = {}

    def put(layer: int, module: str, a: torch.Tensor, b: torch.Tensor) -> None:
        # clone: parts that share linear_in each get their own copy, as save_file requires
        out[HF.format(layer) + module + ".lora_A.weight"] = a.clone()
        out[HF.format(layer) + module + ".lora_B.weight"] = b.clone()

    def adapter(sub: str, part: str) -> torch.Tensor:
        return state[f"{STACK}{sub}.adapter.{part}.weight"]

    for layer in range(adapter("self_attention.linear_qkv", "linear_in").shape[0]):
        a = adapter("self_attention.linear_qkv", "linear_in")[layer]
        b = adapter("self_attention.linear_qkv", "linear_out")[layer]
        grouped = b.view(groups, q_rows + 2 * head_dim, -1)
        put(layer, "self_attn.q_proj", a, grouped[:, :q_rows].reshape(-1, b.shape[-1]))
        put(layer, "self_attn.k_proj", a, grouped[:, q_rows:q_rows + head_dim].reshape(-1, b.shape[-1]))
        put(layer, "self_attn.v_proj", a, grouped[:, q_rows + head_dim:].reshape(-1, b.shape[-1]))
        put(layer, "self_attn.o_proj", adapter("self_attention.linear_proj", "linear_in")[layer],
            adapter("self_attention.linear_proj", "linear_out")[layer])
        a = adapter("mlp.linear_fc1", "linear_in")[layer]
        gate, up = adapter("mlp.linear_fc1", "linear_out")[layer].chunk(2)
        put(layer, "mlp.gate_proj", a, gate)
        put(layer, "mlp.up_proj", a, up)
        put(layer, "mlp.down_proj", adapter("mlp.linear_fc2", "linear_in")[layer],
            adapter("mlp.linear_fc2", "linear_out")[layer])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-model", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    iter_dir = iter_dir_of(a.checkpoint)
    peft = yaml.safe_load((iter_dir / "run_config.yaml").read_text())["peft"]
    config = json.loads((a.hf_model / "config.json").read_text())

    t0 = time.perf_counter()
    state = load_adapters(iter_dir)
    t1 = time.perf_counter()
    tensors = convert(state, config)
    t2 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, a.out / "adapter_model.safetensors")  # no metadata, as Megatron-Bridge writes it
    (a.out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(a.hf_model), "r": peft["dim"],
        "lora_alpha": peft["alpha"], "lora_dropout": peft["dropout"], "task_type": "CAUSAL_LM",
        "target_modules": sorted({k.split(".")[-3] for k in tensors})}, indent=2))
    t3 = time.perf_counter()
    print(json.dumps({"import": imported - start, "load": t1 - t0, "convert": t2 - t1, "save": t3 - t2,
                      "total_in_process": t3 - start,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
