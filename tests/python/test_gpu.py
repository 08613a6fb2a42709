"""The GPU path: the NCCL backend and CUDA verification, held to the MPI backend and CPU verification.

Each case exports one generated checkpoint twice with the same `mpirun -np N`: once over MPI with
verification on the CPU, once over NCCL (a GPU per rank) with verification on `cuda:0`. The two
adapters must be byte-identical, both verifications must pass, and their logits (all variants, from
each run's verification.h5) must agree to float32 rounding. Stock PEFT on the NCCL export must also
match the independent fp32 merge of peft_reference.py.

A machine without a CUDA GPU skips this whole module; ctest then lists the test as skipped (its
SKIP_REGULAR_EXPRESSION matches the reason), never as passed. A layout needing more GPUs than
the machine has skips with the count in the reason.
"""
import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import REFERENCE_TOKENS, live_tensors, merged_reference_logits, peft_logits
from test_deepseek_v3 import BASES as MLA_BASES, checkpoint as mla_checkpoint
from test_families import MOE_BASES
from test_glm4_moe import BASE as GLM_BASE, checkpoint as glm_checkpoint
from test_gpt_oss import BASE as GPT_OSS_BASE, checkpoint as gpt_oss_checkpoint
from test_nemotron_h import BASE as NEMOTRON_H_BASE, LOADABLE as NEMOTRON_H_TARGETS
from tiny_llama import TinyLlamaConfig, build_tiny_llama

GPUS = torch.cuda.device_count()
if GPUS == 0:
    pytest.skip("GPU tests not run: no CUDA GPU on this machine", allow_module_level=True)

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-x", "NCCL_NVLS_ENABLE=0"]
TOKENS = torch.tensor([REFERENCE_TOKENS])
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
LOGITS_RTOL = 1e-4  # float32 on different devices: measured 5e-7 (docs/GPU.md)
PEFT_ATOL = 1e-4
# Eight heads in four query groups, so TP 4 still gives each rank a whole group.
DIMS = dict(num_layers=4, hidden=128, heads=8, query_groups=4, head_dim=16, ffn=256)
BASE = TinyLlamaConfig(layers=4, hidden=128, heads=8, kv_heads=4, head_dim=16, ffn=256)

# (kind, TP, PP, ranks): the three 4-GPU layouts, and fewer ranks than TP x PP.
CASES = [("lora", 2, 2, 4), ("dora", 4, 1, 4), ("canonical_lora", 1, 4, 4), ("dora", 2, 2, 2)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_llama(BASE, tmp_path_factory.mktemp("gpu") / "base")


def export(binary, ranks, base, ckpt, out, backend, device):
    report = out.with_suffix(".json")
    proc = run([*MPIRUN, "-np", ranks, binary, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt,
                "--output-hf-path", out, "--backend", backend, "--verify-device", device,
                "--verify-h5", out.with_suffix(".h5"), "--report", report], timeout=300)
    return json.loads(report.read_text()), proc


def logits(h5_path):
    with h5py.File(h5_path, "r") as f:
        return {v: f[f"prompts/0/logits/{v}"][()] for v in ("base", "peft", "merged")}


def assert_same_adapter_and_logits(gpu_run, cpu_run):
    """Two exports of one checkpoint (`<dir>` + `<dir>.h5` each): byte-identical adapter files, and
    every variant's logits within float32 rounding of the CPU run's."""
    for name in ADAPTER_FILES:
        assert (gpu_run / name).read_bytes() == (cpu_run / name).read_bytes(), name
    cuda, cpu = logits(gpu_run.with_suffix(".h5")), logits(cpu_run.with_suffix(".h5"))
    for variant in cpu:
        worst = np.abs(cuda[variant] - cpu[variant]).max() / np.abs(cpu[variant]).max()
        assert worst < LOGITS_RTOL, f"{variant}: CUDA vs CPU logits differ by {worst:.2e} of their scale"


@pytest.mark.parametrize("kind,tp,pp,ranks", CASES, ids=[f"{k}-tp{t}pp{p}-np{n}" for k, t, p, n in CASES])
def test_nccl_export_and_cuda_verification_match_mpi_and_cpu(adapter_job_bin, base, tmp_path, kind, tp, pp, ranks):
    if ranks > GPUS:
        pytest.skip(f"needs {ranks} GPUs, this machine has {GPUS}")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind=kind, tp=tp, pp=pp, **DIMS)
    written = write_checkpoint(cfg)

    mpi, _ = export(adapter_job_bin, ranks, base, written.root, tmp_path / "mpi", "mpi", "cpu")
    nccl, proc = export(adapter_job_bin, ranks, base, written.root, tmp_path / "nccl", "nccl", "cuda")
    assert (mpi["backend"], nccl["backend"]) == ("mpi", "nccl")
    assert nccl["verification"]["device"].startswith("cuda"), nccl["verification"]["device"]
    assert mpi["verification"]["device"] == "cpu"
    assert mpi["verification"]["passed"] and nccl["verification"]["passed"], proc.stdout

    assert_same_adapter_and_logits(tmp_path / "nccl", tmp_path / "mpi")

    peft = peft_logits(base, tmp_path / "nccl", TOKENS)
    assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
    reference = merged_reference_logits(base, live_tensors(written), kind, cfg.alpha, cfg.dim, TOKENS,
                                        nq=cfg.heads, ng=cfg.query_groups, head_dim=cfg.head_dim, ffn=cfg.ffn)
    diff = (peft.logits - reference).abs().max().item()
    assert diff < PEFT_ATOL, f"PEFT on the NCCL export vs the fp32 merged reference: max |diff| {diff:.3g}"


def test_moe_over_nccl_and_cuda_match_mpi_and_cpu(adapter_job_bin, tmp_path):
    """Expert adapters of a Qwen3-MoE checkpoint (EP2, shards by expert-parallel rank) over NCCL, and the sparse MoE
    forward on CUDA, against MPI and the CPU."""
    if GPUS < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {GPUS}")
    moe = TinyLlamaConfig(architecture="qwen3_moe", head_dim=32)
    base = build_tiny_llama(moe, tmp_path / "base")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind="lora", tp=2, heads=moe.heads,
                           query_groups=moe.kv_heads, head_dim=moe.head_dim, hidden=moe.hidden, ffn=moe.ffn,
                           num_layers=moe.layers, experts=moe.experts, expert_ffn=moe.expert_ffn,
                           topk=moe.experts_per_token, ep=2, etp=1, share_expert_adapters=False)
    written = write_checkpoint(cfg)
    mpi, _ = export(adapter_job_bin, 2, base, written.root, tmp_path / "mpi", "mpi", "cpu")
    nccl, proc = export(adapter_job_bin, 2, base, written.root, tmp_path / "nccl", "nccl", "cuda")
    assert nccl["backend"] == "nccl" and nccl["verification"]["device"].startswith("cuda")
    assert mpi["verification"]["passed"] and nccl["verification"]["passed"], proc.stdout
    assert_same_adapter_and_logits(tmp_path / "nccl", tmp_path / "mpi")


def per_rank_gpu_launcher(tmp_path, visible):
    """A launcher wrapper that shows each rank only the GPU `visible` names for it, the way
    `srun --gpus-per-task=1` does: every rank then sees one GPU numbered 0."""
    wrapper = tmp_path / "one_gpu_per_rank.sh"
    wrapper.write_text(f'#!/bin/sh\nexport CUDA_VISIBLE_DEVICES="{visible}"\nexec "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_nccl_with_one_visible_gpu_per_rank(adapter_job_bin, base, tmp_path):
    if GPUS < 2:
        pytest.skip(f"needs 2 GPUs, this machine has {GPUS}")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind="lora", tp=2, pp=1, **DIMS)
    written = write_checkpoint(cfg)
    own = per_rank_gpu_launcher(tmp_path, "$OMPI_COMM_WORLD_LOCAL_RANK")
    common = ["--hf-model-id", base, "--megatron-peft-checkpoint", written.root, "--verify-device", "cpu"]

    run([*MPIRUN, "-np", 2, adapter_job_bin, "export", *common, "--output-hf-path", tmp_path / "mpi",
         "--backend", "mpi"], timeout=300)
    report = tmp_path / "nccl.json"
    run([*MPIRUN, "-np", 2, own, adapter_job_bin, "export", *common, "--output-hf-path", tmp_path / "nccl",
         "--backend", "nccl", "--report", report], timeout=300)
    assert json.loads(report.read_text())["backend"] == "nccl"
    for name in ADAPTER_FILES:
        assert (tmp_path / "nccl" / name).read_bytes() == (tmp_path / "mpi" / name).read_bytes(), name

    # Both ranks shown the same GPU 0: NCCL must refuse, naming the shared GPU, and write nothing.
    shared = per_rank_gpu_launcher(tmp_path, "0")
    proc = run([*MPIRUN, "-np", 2, shared, adapter_job_bin, "export", *common, "--output-hf-path",
                tmp_path / "shared", "--backend", "nccl"], timeout=300, check=False)
    assert proc.returncode != 0
    assert "would both drive GPU-" in proc.stdout + proc.stderr, proc.stderr
    assert not (tmp_path / "shared").exists()


def export_one_process(binary, base, ckpt, out, device, *extra):
    report = out.with_suffix(".json")
    proc = run([binary, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt, "--output-hf-path", out,
                "--verify-device", device, "--verify-h5", out.with_suffix(".h5"), "--report", report, *extra],
               timeout=300)
    return json.loads(report.read_text()), proc


def assert_cuda_verification_matches_cpu(binary, base, ckpt, tmp_path, *extra):
    """One process exports `ckpt` verified on the CPU, another on cuda:0: both pass, and agree (bytes, logits, and
    every check's figure within float32 noise)."""
    cpu, _ = export_one_process(binary, base, ckpt, tmp_path / "cpu", "cpu", *extra)
    cuda, proc = export_one_process(binary, base, ckpt, tmp_path / "cuda", "cuda", *extra)
    assert cuda["verification"]["device"].startswith("cuda"), cuda["verification"]["device"]
    assert cpu["verification"]["passed"] and cuda["verification"]["passed"], proc.stdout
    assert_same_adapter_and_logits(tmp_path / "cuda", tmp_path / "cpu")
    figures = [{c["name"]: c["figure"] for c in r["verification"]["checks"]} for r in (cpu, cuda)]
    assert figures[0].keys() == figures[1].keys()
    return figures


@pytest.mark.parametrize("kind", ["lora", "dora", "canonical_lora"])
def test_cuda_verification_matches_cpu_on_one_gpu(adapter_job_bin, base, tmp_path, kind):
    """One process, one GPU: the verdict and every logit of CUDA verification against the CPU's."""
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind=kind, **DIMS)
    written = write_checkpoint(cfg)
    assert_cuda_verification_matches_cpu(adapter_job_bin, base, written.root, tmp_path)


def test_dry_run_names_the_device_verification_then_runs_on(adapter_job_bin, base, tmp_path):
    """--dry-run's verification device (auto, and cuda asked for) is the one the export's verification reports."""
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", base_model=base, **DIMS))
    for device in ("auto", "cuda"):
        args = [adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                "--output-hf-path", tmp_path / device, "--verify-device", device]
        plan = json.loads(run([*args, "--dry-run=json"], timeout=120).stdout)
        assert not (tmp_path / device).exists()
        run([*args, "--report", tmp_path / f"{device}.json"], timeout=300)
        report = json.loads((tmp_path / f"{device}.json").read_text())
        assert plan["verification"]["device"] == report["verification"]["device"] == "cuda:0", device


# The forwards of issue 15 (MLA with YaRN and grouped sigmoid routing, GLM-4.5's partial RoPE, OLMoE's clipped,
# whole-projection-normed q/k, GPT-OSS's sinks, fused biased experts and clamped SwiGLU, Nemotron-H's Mamba-2 scan),
# with expert adapters where the family has experts.
def family_checkpoint(family, base_dir, out):
    if family == "nemotron_h":
        b = NEMOTRON_H_BASE
        base = build_tiny_llama(b, base_dir)
        return base, CheckpointConfig(out=out, base_model=base, targets=NEMOTRON_H_TARGETS, tp=2, hybrid=b.hybrid,
                                      num_layers=len(b.hybrid), hidden=b.hidden, heads=b.heads,
                                      query_groups=b.kv_heads, head_dim=b.head_dim, ffn=b.ffn, per_layer_keys=True)
    if family == "deepseek_v3":  # with its MTP layer, exported (--include-mtp-layers) and checked by its weights
        base = build_tiny_llama(dataclasses.replace(MLA_BASES["mla"], mtp_layers=1), base_dir)
        return base, dataclasses.replace(mla_checkpoint("mla", base, "lora", None, 2, 2, out), mtp_layers=1)
    if family == "gpt_oss":
        base = build_tiny_llama(GPT_OSS_BASE, base_dir)
        return base, gpt_oss_checkpoint(base, out, share_expert_adapters=False)
    if family == "glm4_moe":
        base = build_tiny_llama(GLM_BASE, base_dir)
        return base, glm_checkpoint(base, out)
    b = MOE_BASES["olmoe"]
    base = build_tiny_llama(b, base_dir)
    return base, CheckpointConfig(out=out, base_model=base, kind="lora", tp=2, heads=b.heads, query_groups=b.kv_heads,
                                  head_dim=b.head_dim, hidden=b.hidden, ffn=b.ffn, num_layers=b.layers,
                                  experts=b.experts, expert_ffn=b.expert_ffn, topk=b.experts_per_token, ep=2, etp=1,
                                  share_expert_adapters=False)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "olmoe", "gpt_oss", "nemotron_h"])
def test_cuda_verification_matches_cpu_for_the_newer_families(adapter_job_bin, tmp_path, family):
    """The families' own forwards on `cuda:0` against the CPU's: the same verdict and every logit within float32
    rounding (a routing decision flipped by rounding would show as a large difference here)."""
    base, cfg = family_checkpoint(family, tmp_path / "base", tmp_path / "ckpt")
    written = write_checkpoint(cfg)
    extra = ("--include-mtp-layers",) if cfg.mtp_layers else ()
    cpu, cuda = assert_cuda_verification_matches_cpu(adapter_job_bin, base, written.root, tmp_path, *extra)
    if cfg.mtp_layers:
        name = "mtp_layers_peft_vs_merged_update"
        assert cpu[name] <= 1e-6 and cuda[name] <= 1e-6, (cpu[name], cuda[name])


# A device this test leaves this much memory free: enough for the verifier's CUDA context, far too
# little for the float32 embedding (128,256 x 2,048 = 1.05 GB) it loads first.
OOM_HEADROOM = 768 << 20


def test_out_of_device_memory_is_exit_4_with_the_figure(adapter_job_bin, tmp_path):
    """A GPU another job has filled: verification stops with exit 4 (the machine's, not the input's)
    and libtorch's figure, nothing is published, and the message names the way out."""
    wide = TinyLlamaConfig(layers=1, hidden=2048, heads=16, kv_heads=8, head_dim=128, ffn=256, vocab=128256,
                           tie_word_embeddings=True)
    base = build_tiny_llama(wide, tmp_path / "base")
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, num_layers=1, hidden=2048, heads=16,
                           query_groups=8, head_dim=128, ffn=256)
    written = write_checkpoint(cfg)
    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(free - OOM_HEADROOM, dtype=torch.uint8, device="cuda")
    try:
        proc = run([adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                    "--output-hf-path", tmp_path / "out", "--verify-device", "cuda"], check=False, timeout=300)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert proc.returncode == 4, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "ran out of device memory" in proc.stderr and "--verify-device cpu" in proc.stderr, proc.stderr
    assert "GiB" in proc.stderr or "MiB" in proc.stderr, f"no figure in: {proc.stderr}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.unverified").exists()


def merge_one_process(binary, base, ckpt, out, device, *extra):
    report = out.with_suffix(".json")
    proc = run([binary, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint", ckpt, "--output-hf-path", out,
                "--merge-device", device, "--verify-device", "cuda", "--report", report, *extra], timeout=300)
    return json.loads(report.read_text()), proc


@pytest.mark.parametrize("kind,dtype", [("lora", "auto"), ("dora", "auto"), ("dora", "fp32"), ("canonical_lora", "fp16")])
def test_merge_on_the_gpu_writes_the_cpus_bytes(adapter_job_bin, base, tmp_path, kind, dtype):
    """`merge --merge-device cuda` (device_merge.h) against `--merge-device cpu`: the same files byte for byte, both
    verified; -np 2 on two GPUs too, when the machine has them."""
    cfg = CheckpointConfig(out=tmp_path / "ckpt", base_model=base, kind=kind, **DIMS)
    written = write_checkpoint(cfg)
    cpu, _ = merge_one_process(adapter_job_bin, base, written.root, tmp_path / "cpu", "cpu", "--dtype", dtype,
                               "--max-shard-size", "200KB")
    cuda, proc = merge_one_process(adapter_job_bin, base, written.root, tmp_path / "cuda", "cuda", "--dtype", dtype,
                                   "--max-shard-size", "200KB")
    assert cpu["output_per_rank"]["device"] == ["cpu"] and cuda["output_per_rank"]["device"] == ["cuda:0"]
    # The GPU's buffers: at least one [out, in] float32 block of the largest adapted weight, far below the GPU.
    largest = max(DIMS["ffn"] * DIMS["hidden"], DIMS["heads"] * DIMS["head_dim"] * DIMS["hidden"]) * 4
    assert cpu["output_per_rank"]["gpu_bytes"] == [0]
    assert largest <= cuda["output_per_rank"]["gpu_bytes"][0] < 64 << 20, cuda["output_per_rank"]
    assert cpu["verification"]["passed"] and cuda["verification"]["passed"], proc.stdout
    files = sorted(p.name for p in (tmp_path / "cpu").iterdir())
    assert len([f for f in files if f.startswith("model-")]) > 1
    assert sorted(p.name for p in (tmp_path / "cuda").iterdir()) == files
    for f in files:
        assert (tmp_path / "cuda" / f).read_bytes() == (tmp_path / "cpu" / f).read_bytes(), f"{f} differs"
    if GPUS >= 2:
        report = tmp_path / "np2.json"
        run([*MPIRUN, "-np", "2", adapter_job_bin, "merge", "--hf-model-id", base, "--megatron-peft-checkpoint",
             written.root, "--output-hf-path", tmp_path / "np2", "--merge-device", "cuda", "--dtype", dtype,
             "--max-shard-size", "200KB", "--verify-device", "cuda", "--report", report], timeout=300)
        assert json.loads(report.read_text())["output_per_rank"]["device"] == ["cuda:0", "cuda:1"]
        for f in files:
            assert (tmp_path / "np2" / f).read_bytes() == (tmp_path / "cpu" / f).read_bytes(), f"-np 2: {f} differs"
