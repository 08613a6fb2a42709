"""Nemotron-H (issue 15, part 5): a tiny NemotronHForCausalLM of transformers (Mamba-2 mixer, attention and
squared-ReLU MLP layers, pattern "M*M-") and checkpoints in Megatron's layout: a Mamba layer's mixer.in_proj (its
linear_out saved split in z, x, B, C, dt, as megatron-core saves it) and mixer.out_proj, an attention layer's
linear_qkv / linear_proj and an MLP layer's linear_fc1 / linear_fc2, under per-layer keys, at TP 1 and 2.

The exported adapter must load in stock PEFT with no warning and give the logits of an independent fp32 merge of the
Megatron tensors (`reference_model` below maps the modules as Megatron-Bridge's nemotron_h_bridge.py does); our
verification's forward (a sequential Mamba-2 scan) must give transformers' base logits, stock PEFT's and that merge's,
and fail an adapter whose in_proj rows are in TP-rank order. Stock PEFT refuses LoRA on a Mamba out_proj, so an adapter
with one is refused by `export` and `verify` and merged by `merge`, whose model transformers loads with the same logits
as the reference."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import load_base, logits_of, peft_logits
from test_families import MPIRUN, export, export_verified_and_alone
from test_verify import EXIT_BAD_INPUT, EXIT_FAILED, MIN_EFFECT, REL_TOL, prompts_for, rel_err, verify
from tiny_llama import TinyLlamaConfig, build_tiny_llama

BASE = TinyLlamaConfig(architecture="nemotron_h", hybrid="M*M-", ffn=96)
LOADABLE = ("in_proj", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
PARTS = ("z", "x", "B", "C", "dt")
# HF leaf of each Megatron module but linear_qkv (Megatron-Bridge nemotron_h_bridge.py mapping_registry).
ONE_TO_ONE = {"mixer.in_proj": "in_proj", "mixer.out_proj": "out_proj", "self_attention.linear_proj": "o_proj",
              "mlp.linear_fc1": "up_proj", "mlp.linear_fc2": "down_proj"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(BASE, tmp_path_factory.mktemp("nemotron_h") / "base")


def checkpoint(base, targets, tp, out):
    return write_checkpoint(CheckpointConfig(out=out, base_model=base, targets=targets, tp=tp, hybrid=BASE.hybrid,
                                             num_layers=len(BASE.hybrid), hidden=BASE.hidden, heads=BASE.heads,
                                             query_groups=BASE.kv_heads, head_dim=BASE.head_dim, ffn=BASE.ffn,
                                             per_layer_keys=True))


def reference_model(base, tensors, alpha, dim):
    """The base with every Megatron adapter merged in fp32: in_proj's lora_B is its parts in z, x, B, C, dt order,
    linear_qkv's rows per query group [q heads; k; v], the rest one to one."""
    model = load_base(base)
    state = model.state_dict()
    d, groups, per_group = BASE.head_dim, BASE.kv_heads, BASE.heads // BASE.kv_heads
    for key in {k.split(".adapter.")[0] for k in tensors}:
        layer, module = key[len("decoder.layers."):].split(".", 1)
        a = tensors[f"{key}.adapter.linear_in.weight"].float()
        b = (torch.cat([tensors[f"{key}.adapter.linear_out.weight.{p}"] for p in PARTS]) if module == "mixer.in_proj"
             else tensors[f"{key}.adapter.linear_out.weight"]).float()
        delta = alpha / dim * b @ a
        prefix = f"model.layers.{layer}.mixer."
        if module == "self_attention.linear_qkv":
            rows = delta.reshape(groups, (per_group + 2) * d, -1)
            for leaf, (begin, end) in {"q_proj": (0, per_group * d), "k_proj": (per_group * d, (per_group + 1) * d),
                                       "v_proj": ((per_group + 1) * d, (per_group + 2) * d)}.items():
                state[f"{prefix}{leaf}.weight"] += rows[:, begin:end].reshape(-1, delta.shape[1])
        else:
            state[f"{prefix}{ONE_TO_ONE[module]}.weight"] += delta
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("tp", [1, 2])
def test_export_loads_in_peft_and_matches_the_fp32_merge(adapter_job_bin, base, tmp_path, tp):
    written = checkpoint(base, LOADABLE, tp, tmp_path / "ckpt")
    out = export_verified_and_alone(adapter_job_bin, base, written.root, tmp_path / "adapter", tp)
    names = set(load_file(out / "adapter_model.safetensors"))
    # Megatron-Bridge's names: the safetensors' backbone.*, which transformers and PEFT rename to model.* on load.
    assert "base_model.model.backbone.layers.0.mixer.in_proj.lora_B.weight" in names
    assert "base_model.model.backbone.layers.1.mixer.k_proj.lora_A.weight" in names
    assert "base_model.model.backbone.layers.3.mixer.up_proj.lora_A.weight" in names
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "in_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]

    reference, hf = reference_model(base, written.tensors, 16, 8), load_base(base)
    prompts = prompts_for(BASE.vocab)
    v = verify(adapter_job_bin, base, out, tmp_path / "verify", prompts, ckpt=written.root)
    assert v.rc == 0 and v.report["passed"], v.stdout
    for i, ids in enumerate(prompts):
        peft = peft_logits(base, out, ids)
        assert peft.warnings == [] and peft.missing == [] and peft.unexpected == [], peft
        expected = logits_of(reference, ids)
        assert rel_err(peft.logits, expected) <= REL_TOL
        assert rel_err(logits_of(hf, ids), expected) >= MIN_EFFECT
        # Our forward pass: transformers' base, stock PEFT's and the independent merge's logits.
        assert rel_err(v.logits[i]["base"], logits_of(hf, ids)[0]) <= REL_TOL
        assert rel_err(v.logits[i]["peft"], peft.logits[0]) <= REL_TOL
        assert rel_err(v.logits[i]["merged"], expected[0]) <= REL_TOL


def test_in_proj_rows_in_rank_order_would_be_far_off(adapter_job_bin, base, tmp_path):
    """Both references see in_proj's layout: lora_B's rows as a naive concatenation of TP 2's local blocks
    [z0 x0 B0 C0 dt0 | z1 x1 B1 C1 dt1] give stock PEFT logits far from the merge, and our verification fails them."""
    written = checkpoint(base, ("in_proj",), 2, tmp_path / "ckpt")
    out = tmp_path / "adapter"
    assert export(adapter_job_bin, base, written.root, out, 1, "--no-verify").returncode == 0
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.backbone.layers.2.mixer.in_proj.lora_B.weight"
    inner, gn = BASE.mamba_num_heads * BASE.mamba_head_dim, BASE.n_groups * BASE.ssm_state_size
    parts = torch.split(tensors[key], [inner, inner, gn, gn, BASE.mamba_num_heads])
    tensors[key] = torch.cat([half for rank in range(2) for part in parts for half in part.chunk(2)[rank:rank + 1]])
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    ids = prompts_for(BASE.vocab)[1]
    expected = logits_of(reference_model(base, written.tensors, 16, 8), ids)
    assert rel_err(peft_logits(base, out, ids).logits, expected) > 100 * REL_TOL
    v = verify(adapter_job_bin, base, out, tmp_path / "verify", [ids], ckpt=written.root)
    assert v.rc == EXIT_FAILED and not v.report["passed"], v.stdout
    failed = {c["name"] for c in v.report["checks"] if not c["passed"]}
    assert "peft_vs_merged_max_abs_diff" in failed, failed


def test_out_proj_is_refused_by_export_and_verify_and_merged_by_merge(adapter_job_bin, base, tmp_path):
    written = checkpoint(base, None, 2, tmp_path / "ckpt")  # every target, out_proj among them
    proc = export(adapter_job_bin, base, written.root, tmp_path / "adapter", 1, "--no-verify")
    assert proc.returncode == EXIT_BAD_INPUT, proc.stdout + proc.stderr
    assert "backbone.layers.0.mixer.out_proj' has an adapter" in proc.stderr, proc.stderr
    assert "stock PEFT refuses LoRA on a Mamba mixer's out_proj" in proc.stderr and "adapter_job merge" in proc.stderr
    assert not (tmp_path / "adapter").exists()

    # An adapter that targets out_proj (as Megatron-Bridge's own export writes one) is no PEFT adapter either.
    loadable = checkpoint(base, LOADABLE, 1, tmp_path / "ckpt-loadable")
    out = tmp_path / "adapter-loadable"
    assert export(adapter_job_bin, base, loadable.root, out, 1, "--no-verify").returncode == 0
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config | {"target_modules": config["target_modules"] +
                                                                  ["out_proj"]}))
    proc = run([adapter_job_bin, "verify", "--hf-model-id", base, "--hf-adapter-path", out, "--verify-device", "cpu"],
               check=False)
    assert proc.returncode == EXIT_BAD_INPUT and "stock PEFT refuses LoRA on a Mamba-based model's out_proj" in \
        proc.stderr, proc.stdout + proc.stderr

    # The merged files store bf16, as the base does: the reference's weights rounded so once.
    reference = reference_model(base, written.tensors, 16, 8)
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in reference.state_dict().items()})
    from transformers import AutoModelForCausalLM
    for ranks in (1, 2):
        merged = tmp_path / f"merged-np{ranks}"
        launcher = [*MPIRUN, "-np", str(ranks)] if ranks > 1 else []
        proc = run([*launcher, adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint",
                    written.root, "--output-hf-path", merged, "--verify-device", "cpu"], check=False)
        assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
        model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
        for ids in prompts_for(BASE.vocab):
            assert rel_err(logits_of(model, ids), logits_of(reference, ids)) <= REL_TOL
