"""The Python verification pipeline the benchmark holds `adapter_job verify` against: the steps of Megatron-Bridge's
verify_adapter.py with --lora-checkpoint, done the fastest way transformers and peft allow.

1. transformers loads the base model in float32 straight onto the GPU; its last-token logits are the base.
2. peft's PeftModel.from_pretrained wraps it with the adapter: the PEFT logits (FAIL if they equal the base).
3. The Megatron adapter is loaded with torch.distributed.checkpoint, merged into the base weights in float32
   (W + alpha/r * B @ A) on the GPU, and loaded into the unwrapped model with strict=True: the merged logits
   (verify_adapter.py builds the Megatron model and exports merged weights instead; that is slower).
4. PASS iff the top-k token ids of PEFT and merged agree, as verify_adapter.py decides.

The prompt is the 16 token ids `adapter_job verify` uses on a model without tokenizer.json.

    python bench/reference_verify.py --hf-model DIR --adapter DIR --checkpoint DIR [--device cuda]

Prints one JSON line: seconds per step, top-k agreement, max |logit difference|, peak memory.
"""
import time

start = time.perf_counter()
import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_export import convert, iter_dir_of, load_adapters  # noqa: E402

imported = time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-model", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top-k", type=int, default=5)
    a = ap.parse_args()
    times = {"import": imported - start}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        times[name] = now - since
        return now

    t = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(a.hf_model, dtype=torch.float32, device_map=a.device)
    vocab = base.config.vocab_size
    ids = torch.tensor([[i * 7919 % vocab for i in range(1, 17)]], device=a.device)
    with torch.inference_mode():
        base_logits = base(ids).logits[0, -1].float().cpu()
    t = lap("base", t)

    model = PeftModel.from_pretrained(base, a.adapter)
    with torch.inference_mode():
        peft_logits = model(ids).logits[0, -1].float().cpu()
    adapter_loaded = (peft_logits - base_logits).abs().max().item() >= 1e-6
    t = lap("peft", t)

    plain = model.unload()  # the base model again, without LoRA layers
    iter_dir = iter_dir_of(a.checkpoint)
    import yaml
    peft_cfg = yaml.safe_load((iter_dir / "run_config.yaml").read_text())["peft"]
    scale = peft_cfg["alpha"] / peft_cfg["dim"]
    adapters = convert(load_adapters(iter_dir), base.config.to_dict())
    state = plain.state_dict()
    with torch.no_grad():
        for key, lora_a in adapters.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_b = adapters[key.replace("lora_A", "lora_B")]
            w = state[module + ".weight"]
            w += scale * (lora_b.to(w.device, torch.float32) @ lora_a.to(w.device, torch.float32))
    plain.load_state_dict(state, strict=True)
    with torch.inference_mode():
        merged_logits = plain(ids).logits[0, -1].float().cpu()
    lap("merged", t)

    same_top_k = torch.equal(peft_logits.topk(a.top_k).indices, merged_logits.topk(a.top_k).indices)
    times["total_in_process"] = time.perf_counter() - start
    print(json.dumps({
        "seconds": times, "passed": bool(adapter_loaded and same_top_k), "adapter_changes_logits": adapter_loaded,
        "top_k_equal": bool(same_top_k), "max_abs_diff_peft_merged": (peft_logits - merged_logits).abs().max().item(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else 0}))


if __name__ == "__main__":
    main()
