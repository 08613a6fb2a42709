"""`adapter_job export` end to end, under MPI with 1..4 ranks, held to independent references:

* Megatron-Bridge's own export of its real checkpoints (same tensors bit for bit, same adapter_config.json), and
  its fp32 merged-reference logits;
* generated checkpoints (LoRA, DoRA, CanonicalLoRA; TP x PP up to 2x2, VPP, per-layer keys, GQA, N != TP*PP):
  stock PEFT loads the export without a warning or a missing/unexpected key, and its logits equal an fp32 merge
  computed by peft_reference.py from the checkpoint's live tensors;
* the file formats (safetensors bytes = Python's save_file; adapter_config.json exactly as Megatron-Bridge writes
  it), the independence of the output from the number of ranks, and the bytes each rank reads.
"""
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from conftest import run
from dcp_helpers import bits
from megatron_checkpoint import CANONICAL_TARGETS, FUSED_TARGETS, CheckpointConfig, write_checkpoint
from peft_reference import (REFERENCE_TOKENS, hf_adapters, live_tensors, load_base, logits_of,
                            merged_reference_logits, peft_logits)
from tiny_llama import TinyLlamaConfig, build_tiny_llama

torch.set_num_threads(1)

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
PREFIX = "base_model.model."
ATOL = 1e-4            # fp32: PEFT on Megatron-Bridge's export vs the fp32 merge is 7e-7 (fixture README)
MIN_EFFECT = 1e-2      # an adapter must move the logits by far more than ATOL, or a test could not fail
TOKENS = torch.tensor([REFERENCE_TOKENS])
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
HF_LEAVES = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
             "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",), "linear_q": ("q_proj",),
             "linear_k": ("k_proj",), "linear_v": ("v_proj",), "linear_fc1_gate": ("gate_proj",),
             "linear_fc1_up": ("up_proj",)}


def adapter_job(binary, command, np, *args, check=True, cwd=None, env=None):
    """`adapter_job <command> args` under `mpirun -np <np>`, or as a plain process (MPI singleton) if np is None."""
    launcher = [] if np is None else [*MPIRUN, "-np", str(np)]
    return run([*launcher, binary, command, *args], check=check, cwd=cwd, timeout=120,
               env={**os.environ, **(env or {})})


def same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, (key, ours[key].dtype, ours[key].shape)
        assert torch.equal(bits(ours[key]), bits(t)), key


def adapter_bytes_per_file(iter_dir: Path) -> Counter:
    """Bytes of adapter-tensor chunks per shard file, from the checkpoint's .metadata as torch reads it."""
    meta = FileSystemReader(str(iter_dir)).read_metadata()
    adapters = {k for k, v in meta.state_dict_metadata.items()
                if isinstance(v, TensorStorageMetadata) and ".adapter." in k}
    per_file = Counter()
    for index, info in meta.storage_data.items():
        if index.fqn in adapters:
            per_file[info.relative_path] += info.length
    return per_file


def check_bytes_read(report: dict, iter_dir: Path, np: int, tp: int, pp: int) -> None:
    per_file = adapter_bytes_per_file(iter_dir)
    read = report["bytes_read_per_rank"]
    assert report["ranks"] == np and len(read) == np
    assert read == report["expected_bytes_per_rank"]
    assert sum(read) == sum(per_file.values()), "every adapter chunk is read exactly once"
    if np == tp * pp:  # rank r reads exactly what training rank r wrote
        assert read == [per_file[f"__{r}_0.distcp"] for r in range(np)]
    # Every rank reports its own peak memory, and none holds more than a small process does.
    rss = report["peak_rss_bytes_per_rank"]
    assert len(rss) == np and all(1 << 20 < b < 512 << 20 for b in rss), rss


# ---------------------------------------------------------------------------------------------------------------
# 1. Megatron-Bridge's real checkpoints against Megatron-Bridge's own export

REAL_CASES = [(layout, level, np) for layout, nps in (("tp1pp1", (1, 2)), ("tp2pp2", (1, 2, 4)))
              for level in ("run_dir", "iter_dir") for np in nps]


@pytest.fixture(scope="module")
def real_reference(mb_fixtures):
    logits = load_file(mb_fixtures / "tp1pp1/lora/logits.safetensors")
    assert logits["tokens"].tolist() == REFERENCE_TOKENS
    return logits


@pytest.mark.parametrize("layout,level,np", REAL_CASES)
def test_real_checkpoint_matches_megatron_bridge(adapter_job_bin, mb_fixtures, real_reference, tmp_path,
                                                 layout, level, np):
    ckpt = mb_fixtures / layout / "lora/megatron_ckpt"
    iter_dir = ckpt / "iter_0000001"
    hf_id, out, report = str(mb_fixtures / "hf_base"), tmp_path / "adapter", tmp_path / "report.json"
    adapter_job(adapter_job_bin, "export", np, "--hf-model-id", hf_id, "--output-hf-path", out, "--dtype", "bf16",
                "--megatron-peft-checkpoint", iter_dir if level == "iter_dir" else ckpt, "--report", report)
    mb = mb_fixtures / layout / "lora/mb_export_adapter"

    ours = load_file(out / "adapter_model.safetensors")
    same_tensors(ours, load_file(mb / "adapter_model.safetensors"))
    assert (out / "adapter_model.safetensors").read_bytes() == (mb / "adapter_model.safetensors").read_bytes()

    config, mb_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, mb))
    assert config["base_model_name_or_path"] == hf_id
    assert list(config) == list(mb_config)
    assert {**config, "base_model_name_or_path": None} == {**mb_config, "base_model_name_or_path": None}
    assert (out / "adapter_config.json").read_text() == (mb / "adapter_config.json").read_text().replace(
        json.dumps(mb_config["base_model_name_or_path"]), json.dumps(hf_id))

    peft = peft_logits(mb_fixtures / "hf_base", out, TOKENS)
    assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
    diff = (peft.logits - real_reference["megatron_merged_reference_fp32"]).abs().max().item()
    assert diff < ATOL, f"PEFT on the export vs Megatron-Bridge's fp32 merged reference: max |diff| {diff:.3g}"
    assert (peft.logits - real_reference["hf_base_fp32"]).abs().max() > MIN_EFFECT

    doc = json.loads(report.read_text())
    assert doc["tensors"] == len(ours) and Path(doc["output"]).resolve() == out.resolve()
    tp, pp = (1, 1) if layout == "tp1pp1" else (2, 2)
    check_bytes_read(doc, iter_dir, np, tp, pp)


def test_real_checkpoint_fp32_is_exact_upcast(adapter_job_bin, mb_fixtures, real_reference, tmp_path):
    out = tmp_path / "adapter"
    adapter_job(adapter_job_bin, "export", 2, "--hf-model-id", mb_fixtures / "hf_base", "--output-hf-path", out,
                "--megatron-peft-checkpoint", mb_fixtures / "tp2pp2/lora/megatron_ckpt", "--dtype", "fp32")
    mb = load_file(mb_fixtures / "tp2pp2/lora/mb_export_adapter/adapter_model.safetensors")
    same_tensors(load_file(out / "adapter_model.safetensors"), {k: v.float() for k, v in mb.items()})
    peft = peft_logits(mb_fixtures / "hf_base", out, TOKENS)
    assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
    assert (peft.logits - real_reference["megatron_merged_reference_fp32"]).abs().max() < ATOL


def test_real_checkpoint_stream(adapter_job_bin, mb_fixtures, tmp_path):
    """`stream --output` holds the export's tensors under the raw HF names, and writes nothing else."""
    work = tmp_path / "cwd"
    work.mkdir()
    adapter_job(adapter_job_bin, "stream", 4, "--hf-model-id", mb_fixtures / "hf_base", "--dtype", "bf16",
                "--megatron-peft-checkpoint", mb_fixtures / "tp2pp2/lora/megatron_ckpt", "--output", "x.safetensors",
                cwd=work)
    assert sorted(p.name for p in work.iterdir()) == ["x.safetensors"]
    mb = load_file(mb_fixtures / "tp2pp2/lora/mb_export_adapter/adapter_model.safetensors")
    assert all(k.startswith(PREFIX) for k in mb)
    same_tensors(load_file(work / "x.safetensors"), {k.removeprefix(PREFIX): v for k, v in mb.items()})


# ---------------------------------------------------------------------------------------------------------------
# 2. Generated checkpoints

BASES = {
    "llama4": TinyLlamaConfig(),                                               # the generator's default dims
    "llama8": TinyLlamaConfig(layers=8),                                       # for VPP 2 x PP 2
    "gqa": TinyLlamaConfig(heads=8, kv_heads=2, head_dim=8, hidden=64, ffn=128),  # 4 q heads per group
}
# name: (base, CheckpointConfig fields). Values are seeded per key, so checkpoints of the same kind and dims hold
# the same tensors whatever their TP, PP or key layout.
CKPTS = {
    "lora_tp1pp1": ("llama4", dict(kind="lora")),
    "lora_tp2pp2": ("llama4", dict(kind="lora", tp=2, pp=2)),
    "dora_tp2pp2": ("llama4", dict(kind="dora", tp=2, pp=2)),
    "dora_tp1pp2_r4": ("llama4", dict(kind="dora", tp=1, pp=2, dim=4, alpha=32, dropout=0.05)),
    "dora_tp2pp1_per_layer": ("llama4", dict(kind="dora", tp=2, pp=1, per_layer_keys=True)),
    "dora_tp1pp2_vpp2": ("llama8", dict(kind="dora", tp=1, pp=2, vpp=2, num_layers=8)),
    "canonical_tp2pp2": ("llama4", dict(kind="canonical_lora", tp=2, pp=2)),
    "canonical_tp2pp1_some": ("llama4", dict(kind="canonical_lora", tp=2, pp=1,
                                             targets=("linear_q", "linear_v", "linear_fc1_up", "linear_fc2"))),
    "lora_gqa_tp2pp1": ("gqa", dict(kind="lora", tp=2, pp=1, heads=8, query_groups=2, head_dim=8)),
}


@dataclass
class Generated:
    written: object
    cfg: CheckpointConfig
    base: Path


@dataclass
class Export:
    out: Path
    report: dict
    gen: Generated


class Store:
    """Checkpoints, bases and exports of this module, each made once, on first use."""

    def __init__(self, root: Path, binary: Path):
        self.root, self.binary = root, binary
        self.bases, self.ckpts, self.exports, self.base_logits = {}, {}, {}, {}

    def base(self, name: str) -> Path:
        if name not in self.bases:
            self.bases[name] = build_tiny_llama(BASES[name], self.root / "bases" / name)
        return self.bases[name]

    def ckpt(self, name: str) -> Generated:
        if name not in self.ckpts:
            base_name, fields = CKPTS[name]
            base = self.base(base_name)
            cfg = CheckpointConfig(out=self.root / "ckpts" / name, base_model=base, **fields)
            self.ckpts[name] = Generated(write_checkpoint(cfg), cfg, base)
        return self.ckpts[name]

    def export(self, name: str, np) -> Export:
        """np None: a plain process. Odd np passes the iter_* dir, even np the run dir."""
        if (name, np) not in self.exports:
            gen = self.ckpt(name)
            tag = f"{name}-np{np or 'plain'}"
            out, report = self.root / "exports" / tag / "adapter", self.root / "exports" / f"{tag}.json"
            ckpt = gen.written.iter_dir if (np or 1) % 2 else gen.written.root
            adapter_job(self.binary, "export", np, "--hf-model-id", gen.base, "--megatron-peft-checkpoint", ckpt,
                        "--output-hf-path", out, "--report", report)
            self.exports[(name, np)] = Export(out, json.loads(report.read_text()), gen)
        return self.exports[(name, np)]

    def logits_of_base(self, base: Path) -> torch.Tensor:
        if base not in self.base_logits:
            self.base_logits[base] = logits_of(load_base(base), TOKENS)
        return self.base_logits[base]


@pytest.fixture(scope="module")
def store(tmp_path_factory, adapter_job_bin):
    return Store(tmp_path_factory.mktemp("export"), adapter_job_bin)


def reference_logits(gen: Generated, qkv_split="grouped") -> torch.Tensor:
    c = gen.cfg
    return merged_reference_logits(gen.base, live_tensors(gen.written), c.kind, c.alpha, c.dim, TOKENS,
                                   nq=c.heads, ng=c.query_groups, head_dim=c.head_dim, ffn=c.ffn,
                                   qkv_split=qkv_split)


PEFT_CASES = [
    ("lora_tp1pp1", 1), ("lora_tp2pp2", 4), ("lora_tp2pp2", 3), ("lora_tp2pp2", 1),
    ("dora_tp2pp2", 4), ("dora_tp2pp2", 1), ("dora_tp1pp2_r4", 2), ("dora_tp1pp2_r4", 4),
    ("dora_tp2pp1_per_layer", 2), ("dora_tp2pp1_per_layer", 3), ("dora_tp1pp2_vpp2", 2), ("dora_tp1pp2_vpp2", 1),
    ("canonical_tp2pp2", 4), ("canonical_tp2pp2", 3), ("canonical_tp2pp1_some", 2),
    ("lora_gqa_tp2pp1", 2), ("lora_gqa_tp2pp1", 1),
]


@pytest.mark.parametrize("name,np", PEFT_CASES)
def test_peft_loads_export_and_matches_merged_reference(store, name, np):
    e = store.export(name, np)
    peft = peft_logits(e.gen.base, e.out, TOKENS)
    assert peft.warnings == []
    assert peft.missing == [] and peft.unexpected == []
    reference = reference_logits(e.gen)
    diff = (peft.logits - reference).abs().max().item()
    assert diff < ATOL, f"PEFT on the export vs the fp32 merged reference: max |diff| {diff:.3g}"
    effect = (reference - store.logits_of_base(e.gen.base)).abs().max().item()
    assert effect > MIN_EFFECT, f"the adapter barely changes the logits ({effect:.3g}): the test could not fail"
    if e.gen.cfg.kind == "dora":
        assert sum(k.endswith(".lora_magnitude_vector") for k in load_file(e.out / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# 3. GQA: the test above must be able to fail on a contiguous QKV split

def test_gqa_contiguous_qkv_split_would_fail(store, tmp_path):
    e = store.export("lora_gqa_tp2pp1", 2)
    c = e.gen.cfg
    assert c.heads != c.query_groups > 1
    good, wrong = reference_logits(e.gen), reference_logits(e.gen, qkv_split="contiguous")
    assert (good - wrong).abs().max() > MIN_EFFECT

    # An adapter whose q/k/v lora_B come from a contiguous split: PEFT loads it silently, the comparison catches it.
    tensors = load_file(e.out / "adapter_model.safetensors")
    contiguous = hf_adapters(live_tensors(e.gen.written), c.heads, c.query_groups, c.head_dim, "contiguous")
    changed = 0
    for path, p in contiguous.items():
        if path.endswith(("q_proj", "k_proj", "v_proj")):
            key = f"{PREFIX}{path}.lora_B.weight"
            assert tensors[key].shape == p["B"].shape
            changed += not torch.equal(tensors[key].float(), p["B"])
            tensors[key] = p["B"].to(tensors[key].dtype)
    assert changed
    bad = tmp_path / "contiguous"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors")
    shutil.copy(e.out / "adapter_config.json", bad)
    peft = peft_logits(e.gen.base, bad, TOKENS)
    assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
    assert (peft.logits - good).abs().max() > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------------
# 4. File formats

def expected_config(gen: Generated) -> dict:
    c = gen.cfg
    targets = c.targets or (CANONICAL_TARGETS if c.kind == "canonical_lora" else FUSED_TARGETS)
    return {
        "peft_type": "LORA", "auto_mapping": None, "base_model_name_or_path": str(gen.base), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "lora_alpha": c.alpha,
        "lora_dropout": c.dropout, "modules_to_save": None, "r": c.dim, "rank_pattern": {}, "alpha_pattern": {},
        "target_modules": sorted({leaf for t in targets for leaf in HF_LEAVES[t]}), "task_type": "CAUSAL_LM",
        "use_dora": c.kind == "dora", "use_rslora": False,
    }


@pytest.mark.parametrize("name,np", [("lora_tp2pp2", 4), ("dora_tp2pp2", 4), ("dora_tp1pp2_r4", 2),
                                     ("canonical_tp2pp2", 4), ("canonical_tp2pp1_some", 2)])
def test_files_are_what_python_writes(store, tmp_path, name, np):
    e = store.export(name, np)
    ours = e.out / "adapter_model.safetensors"
    tensors = load_file(ours)
    save_file(tensors, tmp_path / "python.safetensors")
    assert ours.read_bytes() == (tmp_path / "python.safetensors").read_bytes()
    assert all(k.startswith(PREFIX) for k in tensors)

    text = (e.out / "adapter_config.json").read_text()
    config, expected = json.loads(text), expected_config(e.gen)
    assert config == expected
    assert list(config) == list(expected)
    assert type(config["lora_alpha"]) is int and type(config["lora_dropout"]) is float
    assert text == json.dumps(expected, indent=2)
    assert sorted(p.name for p in e.out.iterdir()) == sorted(ADAPTER_FILES)


# ---------------------------------------------------------------------------------------------------------------
# 5. The output does not depend on the number of ranks (nor on TP, PP or the key layout of the same tensors)

@pytest.mark.parametrize("name", ["lora_tp2pp2", "dora_tp2pp2"])
def test_output_independent_of_rank_count(store, name):
    first = store.export(name, 4)
    for np in (None, 1, 2, 3):
        other = store.export(name, np)
        for f in ADAPTER_FILES:
            assert (other.out / f).read_bytes() == (first.out / f).read_bytes(), (np, f)


@pytest.mark.parametrize("a,b", [(("lora_tp1pp1", 1), ("lora_tp2pp2", 4)),
                                 (("dora_tp2pp1_per_layer", 2), ("dora_tp2pp2", 4))])
def test_output_independent_of_parallel_layout(store, a, b):
    ea, eb = store.export(*a), store.export(*b)
    for f in ADAPTER_FILES:
        assert (ea.out / f).read_bytes() == (eb.out / f).read_bytes(), f


# ---------------------------------------------------------------------------------------------------------------
# 6. Bytes read per rank

@pytest.mark.parametrize("name,np", [("lora_tp2pp2", 4), ("lora_tp2pp2", 3), ("lora_tp2pp2", 1),
                                     ("dora_tp2pp2", 4), ("canonical_tp2pp2", 4), ("dora_tp2pp1_per_layer", 2),
                                     ("dora_tp1pp2_vpp2", 2), ("dora_tp1pp2_r4", 4)])
def test_bytes_read_per_rank(store, name, np):
    e = store.export(name, np)
    per_file = adapter_bytes_per_file(e.gen.written.iter_dir)
    assert len(per_file) == e.gen.cfg.tp * e.gen.cfg.pp and all(per_file.values())
    check_bytes_read(e.report, e.gen.written.iter_dir, np, e.gen.cfg.tp, e.gen.cfg.pp)


# ---------------------------------------------------------------------------------------------------------------
# 7. stream

@pytest.mark.parametrize("name,np", [("dora_tp2pp2", 4), ("canonical_tp2pp1_some", 1)])
def test_stream_gives_export_tensors_under_hf_names(store, adapter_job_bin, tmp_path, name, np):
    e = store.export(name, np)
    adapter_job(adapter_job_bin, "stream", np, "--hf-model-id", e.gen.base,
                "--megatron-peft-checkpoint", e.gen.written.root, "--output", tmp_path / "x.safetensors",
                cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
    exported = load_file(e.out / "adapter_model.safetensors")
    same_tensors(load_file(tmp_path / "x.safetensors"), {k.removeprefix(PREFIX): v for k, v in exported.items()})
