"""Nemotron-H verification at real width: our forward pass against transformers', on the device.

A Nemotron-H-8B-shaped model (hidden 4096, vocab 131072, 32 query / 8 KV heads of 128, ffn 21504, Mamba-2 with 128
heads of 64, state 128, 8 groups) cut to the layers of --pattern (default "M*M-": two Mamba layers, one attention,
one MLP), random bf16 weights, and an r16 LoRA checkpoint in Megatron's layout at TP 2 (in_proj split in z, x, B, C,
dt parts; attention and MLP adapters). `adapter_job export` must pass its verification; then its logits (the h5 file)
are held to transformers' (base) and stock PEFT's (peft) on the same device, in float32.

    python bench/nemotron_h_trust.py --work DIR --bin build/src/cli/adapter_job [--device cuda]

Prints one JSON object: the check figures, and the largest |ours - transformers| / max |transformers| for base and peft.
Exit 1 when the export fails or a difference exceeds 1e-4 (float32 at this width: a scan of 16 tokens over 4096
channels).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import h5py
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
from megatron_checkpoint import CheckpointConfig, Mamba, write_checkpoint  # noqa: E402
from tiny_llama import TinyLlamaConfig, build_tiny_llama  # noqa: E402

REL_TOL = 1e-4
TOKENS = [128000, 791, 6864, 315, 9822, 374, 12366, 13, 578, 6864, 315, 9635, 374, 7295, 13, 578]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--bin", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pattern", default="M*M-")
    a = ap.parse_args()
    mamba = Mamba(mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8)
    shape = TinyLlamaConfig(architecture="nemotron_h", hybrid=a.pattern, hidden=4096, heads=32, kv_heads=8,
                            head_dim=128, ffn=21504, vocab=131072, mamba_num_heads=mamba.mamba_num_heads,
                            mamba_head_dim=mamba.mamba_head_dim, ssm_state_size=mamba.ssm_state_size,
                            n_groups=mamba.n_groups)
    base = a.work / "hf"
    if not (base / "config.json").exists():
        build_tiny_llama(shape, base)
    ckpt = a.work / "ckpt"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        write_checkpoint(CheckpointConfig(
            out=ckpt, base_model=base, tp=2, hybrid=a.pattern, num_layers=len(a.pattern), hidden=shape.hidden,
            heads=shape.heads, query_groups=shape.kv_heads, head_dim=shape.head_dim, ffn=shape.ffn, dim=16, alpha=32,
            mamba=mamba, per_layer_keys=True, write_expected=False,
            targets=("in_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")))
    out, report, h5 = a.work / "adapter", a.work / "export.json", a.work / "export.h5"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    proc = subprocess.run([str(a.bin), "export", "--hf-model-id", str(base), "--megatron-peft-checkpoint", str(ckpt),
                           "--output-hf-path", str(out), "--verify-device", a.device, "--report", str(report),
                           "--verify-h5", str(h5), "--prompt-ids", ",".join(map(str, TOKENS))],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, file=sys.stderr)
        return 1
    verification = json.loads(report.read_text())["verification"]
    with h5py.File(h5, "r") as f:
        ours = {v: torch.from_numpy(f[f"prompts/0/logits/{v}"][()]) for v in ("base", "peft")}

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([TOKENS], device=a.device)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(a.device).eval()
    with torch.no_grad():
        theirs = {"base": model(input_ids=ids).logits[0].float().cpu()}
        model = PeftModel.from_pretrained(model, str(out)).eval()
        theirs["peft"] = model(input_ids=ids).logits[0].float().cpu()
    errors = {v: ((ours[v] - theirs[v]).abs().max() / theirs[v].abs().max()).item() for v in ours}
    effect = ((theirs["peft"] - theirs["base"]).abs().max() / theirs["base"].abs().max()).item()
    print(json.dumps({"device": verification["device"], "passed": verification["passed"],
                      "checks": {c["name"]: [c["figure"], c["threshold"]] for c in verification["checks"]},
                      "rel_err_vs_transformers": errors, "adapter_effect": effect,
                      "seconds": verification.get("seconds")}, indent=1))
    return 0 if verification["passed"] and max(errors.values()) <= REL_TOL and effect > 100 * REL_TOL else 1


if __name__ == "__main__":
    sys.exit(main())
