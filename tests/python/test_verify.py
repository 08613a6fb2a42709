"""`adapter_job verify` (and the verification `export` runs by default), held to independent references:

1. its base logits equal transformers' ``LlamaForCausalLM`` in fp32, on Megatron-Bridge's hf_base and on tiny
   Llamas with Llama-3 rope scaling and with tied embeddings, on a short and a long prompt;
2. its ``peft`` logits equal stock ``PeftModel.from_pretrained`` on the same adapter (LoRA and DoRA exports), and its
   ``merged`` logits equal peft_reference.py's fp32 merge of the checkpoint's live tensors;
3. on Megatron-Bridge's real TP1PP1 checkpoint it passes and reproduces the fixture's logits;
4. mutation tests: faults planted in a correct export (k/v swapped, contiguous QKV split, gate/up swapped, DoRA
   magnitude dropped, alpha ignored, lora_A of one TP shard only, a layer missing) must fail verification (exit 3);
   the correct export must pass (exit 0); the failing checks per fault are printed as a table (``pytest -s``);
5. the HDF5 file agrees with the JSON report;
6. `export` verifies by default and publishes a good adapter; `--no-verify` skips; bad input exits 2.
"""
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from megatron_checkpoint import CheckpointConfig, write_checkpoint
from peft_reference import (REFERENCE_TOKENS, hf_adapters, live_tensors, load_base, logits_of,
                            merged_reference_logits, peft_logits)
from tiny_llama import TinyLlamaConfig, build_tiny_llama

torch.set_num_threads(1)

MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]
PREFIX = "base_model.model."
REL_TOL = 1e-5         # max |ours - reference| / max |reference|, both fp32
MIN_EFFECT = 1e-2      # an adapter must move the logits by far more than the tolerance, or a test could not fail
EXIT_FAILED, EXIT_BAD_INPUT = 3, 2
LONG = 96              # a long prompt: positions well past the first few (and past llama3's original context 64)


def adapter_job(binary, command, *args, np=None, check=True):
    """`adapter_job <command> args` as a plain process (MPI singleton), or under `mpirun -np <np>`."""
    launcher = [] if np is None else [*MPIRUN, "-np", str(np)]
    return run([*launcher, binary, command, *args], check=check, timeout=120, env=dict(os.environ))


def rel_err(ours, reference) -> float:
    ours, reference = torch.as_tensor(ours).float(), torch.as_tensor(reference).float()
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def ids_arg(ids) -> str:
    return ",".join(str(int(i)) for i in ids)


def prompts_for(vocab: int) -> list[torch.Tensor]:
    """[1, n] token ids: Megatron-Bridge's 16 reference tokens, then a long seeded random prompt."""
    long = torch.randint(0, vocab, (1, LONG), generator=torch.Generator().manual_seed(1234))
    return [torch.tensor([REFERENCE_TOKENS]), long]


# ---------------------------------------------------------------------------------------------------------------
# Generated models, checkpoints, exports (all with --no-verify) and verification runs, each made once

BASES = {
    "rope3": TinyLlamaConfig(rope_scaling="llama3", dtype="fp32"),               # Llama-3 rope scaling, fp32
    "tied": TinyLlamaConfig(tie_word_embeddings=True, seed=1),                  # lm_head = embed_tokens, bf16
    "gqa": TinyLlamaConfig(heads=8, kv_heads=2, head_dim=8, hidden=64, ffn=128, seed=2),  # 4 q heads per group
}
# name: (base, CheckpointConfig fields, export dtype). DoRA magnitudes come from the base (realistic row norms).
CKPTS = {
    "lora_rope3_tp2": ("rope3", dict(kind="lora", tp=2, pp=1), "auto"),
    "dora_tied_pp2": ("tied", dict(kind="dora", tp=1, pp=2), "auto"),
    # The mutation subject: GQA with nq != ng > 1 (a contiguous QKV split and a k/v swap are observable), TP 2 (a
    # one-shard lora_A is observable), fp32 values exported as fp32 (bf16 rounding of lora_B is observable).
    "dora_gqa_tp2_fp32": ("gqa", dict(kind="dora", tp=2, pp=1, heads=8, query_groups=2, head_dim=8, dtype="fp32"),
                          "fp32"),
}


@dataclass
class Generated:
    written: object
    cfg: CheckpointConfig
    base: Path
    adapter: Path
    export_stdout: str


@dataclass
class Verified:
    rc: int
    stdout: str
    stderr: str
    report: dict
    logits: list[dict[str, np.ndarray]]      # per prompt: {variant: [tokens, vocab]}
    token_ids: list[np.ndarray]
    h5_checks: dict = field(default_factory=dict)
    h5_passed: int = -1

    def failing(self) -> list[str]:
        return [c["name"] for c in self.report["checks"] if not c["passed"]]

    def figures(self) -> dict[str, float]:
        return {c["name"]: c["figure"] for c in self.report["checks"]}


def verify(binary, hf_dir, adapter, out_stem: Path, prompts=None, ckpt=None, extra=()) -> Verified:
    """`adapter_job verify` with --report and --verify-h5, read back."""
    report, h5 = out_stem.with_suffix(".json"), out_stem.with_suffix(".h5")
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    args = ["--hf-model-id", hf_dir, "--hf-adapter-path", adapter, "--verify-device", "cpu",
            "--report", report, "--verify-h5", h5, *extra]
    if ckpt is not None:
        args += ["--megatron-peft-checkpoint", ckpt]
    for ids in prompts or []:
        args += ["--prompt-ids", ids_arg(ids.flatten())]
    proc = adapter_job(binary, "verify", *args, check=False)
    assert proc.returncode in (0, EXIT_FAILED), \
        f"verify exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with h5py.File(h5, "r") as f:
        n = len(f["prompts"])
        logits = [{v: f[f"prompts/{i}/logits/{v}"][()] for v in f[f"prompts/{i}/logits"]} for i in range(n)]
        token_ids = [f[f"prompts/{i}/token_ids"][()] for i in range(n)]
        checks = {k: f[f"checks/{k}"][()] for k in f["checks"]}
        checks["name"] = list(f["checks/name"].asstr()[()])
        passed = int(f.attrs["passed"])
    return Verified(proc.returncode, proc.stdout, proc.stderr, json.loads(report.read_text()), logits, token_ids,
                    checks, passed)


class Store:
    def __init__(self, root: Path, binary: Path):
        self.root, self.binary = root, binary
        self.bases, self.gens, self.runs = {}, {}, {}

    def base(self, name: str) -> Path:
        if name not in self.bases:
            self.bases[name] = build_tiny_llama(BASES[name], self.root / "bases" / name)
        return self.bases[name]

    def gen(self, name: str) -> Generated:
        if name not in self.gens:
            base_name, fields, dtype = CKPTS[name]
            base = self.base(base_name)
            cfg = CheckpointConfig(out=self.root / "ckpts" / name, base_model=base, **fields)
            written = write_checkpoint(cfg)
            out = self.root / "exports" / name
            proc = adapter_job(self.binary, "export", "--hf-model-id", base, "--megatron-peft-checkpoint",
                               written.root, "--output-hf-path", out, "--dtype", dtype, "--no-verify")
            self.gens[name] = Generated(written, cfg, base, out, proc.stdout)
        return self.gens[name]

    def verified(self, name: str) -> Verified:
        """The generated export verified against its checkpoint on prompts_for(vocab)."""
        if name not in self.runs:
            g = self.gen(name)
            self.runs[name] = verify(self.binary, g.base, g.adapter, self.root / "runs" / name,
                                     prompts_for(256), ckpt=g.written.root)
        return self.runs[name]


@pytest.fixture(scope="module")
def store(tmp_path_factory, adapter_job_bin):
    return Store(tmp_path_factory.mktemp("verify"), adapter_job_bin)


@pytest.fixture(scope="module")
def real_reference(mb_fixtures):
    ref = load_file(mb_fixtures / "tp1pp1/lora/logits.safetensors")
    assert ref["tokens"].flatten().tolist() == REFERENCE_TOKENS
    return ref


@pytest.fixture(scope="module")
def real_run(store, mb_fixtures, real_reference) -> Verified:
    """Megatron-Bridge's real TP1PP1 checkpoint and its own export, on the fixture's 16 tokens and a long prompt."""
    lora = mb_fixtures / "tp1pp1/lora"
    return verify(store.binary, mb_fixtures / "hf_base", lora / "mb_export_adapter", store.root / "real",
                  [real_reference["tokens"].reshape(1, -1), prompts_for(256)[1]], ckpt=lora / "megatron_ckpt")


# ---------------------------------------------------------------------------------------------------------------
# 1. Base logits equal transformers

@pytest.mark.parametrize("model", ["hf_base", "rope3", "tied"])
def test_base_logits_equal_transformers(store, mb_fixtures, real_run, model):
    if model == "hf_base":
        hf_dir, v = mb_fixtures / "hf_base", real_run
    else:
        name = {"rope3": "lora_rope3_tp2", "tied": "dora_tied_pp2"}[model]
        hf_dir, v = store.gen(name).base, store.verified(name)
    config = json.loads((hf_dir / "config.json").read_text())
    if model == "rope3":
        assert config["rope_parameters"]["rope_type"] == "llama3"
    if model == "tied":
        assert config["tie_word_embeddings"] is True
        assert "lm_head.weight" not in load_file(hf_dir / "model.safetensors")
    hf = load_base(hf_dir)
    assert len(v.logits) == 2 and [len(t) for t in v.token_ids] == [16, LONG]
    for i, ids in enumerate(v.token_ids):
        reference = logits_of(hf, torch.from_numpy(ids).reshape(1, -1))[0]
        err = rel_err(v.logits[i]["base"], reference)
        print(f"\n  base logits vs transformers, {model}, {len(ids)} tokens: relative error {err:.3g}")
        assert err < REL_TOL, f"{model}, prompt {i} ({len(ids)} tokens): relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# 2. PEFT variant equals stock PEFT; merged equals an independent fp32 merge

@pytest.mark.parametrize("name", list(CKPTS))
def test_peft_and_merged_variants_equal_references(store, name):
    g, v = store.gen(name), store.verified(name)
    c = g.cfg
    assert v.rc == 0 and v.report["passed"] and v.failing() == [], v.stdout
    for i, ids in enumerate(v.token_ids):
        ids = torch.from_numpy(ids).reshape(1, -1)
        peft = peft_logits(g.base, g.adapter, ids)
        assert peft.warnings == [] and peft.missing == [] and peft.unexpected == []
        merged = merged_reference_logits(g.base, live_tensors(g.written), c.kind, c.alpha, c.dim, ids,
                                         nq=c.heads, ng=c.query_groups, head_dim=c.head_dim, ffn=c.ffn)
        effect = (merged[0] - torch.from_numpy(v.logits[i]["base"])).abs().max().item()
        assert effect > MIN_EFFECT, f"the adapter barely changes the logits ({effect:.3g}): the test could not fail"
        e_peft, e_merged = rel_err(v.logits[i]["peft"], peft.logits[0]), rel_err(v.logits[i]["merged"], merged[0])
        print(f"\n  {name}, {ids.shape[1]} tokens: peft vs stock PEFT {e_peft:.3g}, merged vs fp32 merge "
              f"{e_merged:.3g} (adapter effect {effect:.3g})")
        assert e_peft < REL_TOL, f"{name} prompt {i}: peft variant vs stock PEFT relative error {e_peft:.3g}"
        assert e_merged < REL_TOL, f"{name} prompt {i}: merged variant vs fp32 merge relative error {e_merged:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# 3. Megatron-Bridge's real checkpoint

def test_real_checkpoint_passes_and_matches_fixture_logits(real_run, real_reference):
    v = real_run
    assert v.rc == 0 and v.report["passed"] and "verification PASSED" in v.stdout, v.stdout
    assert {c["name"] for c in v.report["checks"]} >= {
        "adapter_changes_logits", "adapter_tensors_all_applied", "adapter_tensors_none_missing",
        "peft_vs_merged_topk", "peft_vs_merged_max_abs_diff", "peft_vs_merged_mean_abs_diff",
        "peft_vs_merged_min_cosine"}
    assert v.token_ids[0].tolist() == REFERENCE_TOKENS
    for variant, key in (("base", "hf_base_fp32"), ("peft", "peft_on_mb_export_adapter_ckpt"),
                         ("merged", "megatron_merged_reference_fp32")):
        err = rel_err(v.logits[0][variant], real_reference[key][0])
        print(f"\n  real tp1pp1: {variant} vs {key}: relative error {err:.3g}")
        assert err < REL_TOL, f"{variant} vs {key}: relative error {err:.3g}"
    assert (real_reference["megatron_merged_reference_fp32"] - real_reference["hf_base_fp32"]).abs().max() > MIN_EFFECT


# ---------------------------------------------------------------------------------------------------------------
# 4. Mutation tests: every planted fault must fail verification

MUTATION_SUBJECT = "dora_gqa_tp2_fp32"
LAYER_KEY = PREFIX + "model.layers.{}.{}.{}"


def _layers(tensors) -> list[int]:
    return sorted({int(k.split(".layers.")[1].split(".")[0]) for k in tensors})


def _swap(tensors, a: str, b: str, what: str = "lora_B.weight") -> None:
    for layer in _layers(tensors):
        ka, kb = LAYER_KEY.format(layer, a, what), LAYER_KEY.format(layer, b, what)
        assert tensors[ka].shape == tensors[kb].shape, (ka, kb)
        tensors[ka], tensors[kb] = tensors[kb], tensors[ka]


def fault_kv_swapped(tensors, config, g):
    _swap(tensors, "self_attn.k_proj", "self_attn.v_proj")


def fault_qkv_contiguous(tensors, config, g):
    """q/k/v lora_B rebuilt from Megatron's fused linear_out split [q; k; v] contiguously, not per query group."""
    c = g.cfg
    assert c.heads != c.query_groups > 1
    for path, p in hf_adapters(live_tensors(g.written), c.heads, c.query_groups, c.head_dim, "contiguous").items():
        if path.endswith(("q_proj", "k_proj", "v_proj")):
            key = f"{PREFIX}{path}.lora_B.weight"
            assert tensors[key].shape == p["B"].shape
            tensors[key] = p["B"].to(tensors[key].dtype).contiguous()


def fault_gate_up_swapped(tensors, config, g):
    _swap(tensors, "mlp.gate_proj", "mlp.up_proj")


def fault_dora_magnitude_dropped(tensors, config, g):
    dropped = [k for k in tensors if k.endswith("lora_magnitude_vector")]
    assert dropped and config["use_dora"] is True
    for k in dropped:
        del tensors[k]


def fault_alpha_ignored(tensors, config, g):
    assert config["lora_alpha"] != config["r"]
    config["lora_alpha"] = config["r"]


def fault_lora_a_one_tp_shard(tensors, config, g):
    """lora_A as if only TP rank 0's shard were read and used for both ranks: the second TP half is REPLACED BY A
    COPY OF THE FIRST (not zeroed), along the axis Megatron splits lora_A on: the rank dim (rows) under the
    column-parallel bases (q, k, v, gate, up), the input dim (columns) under the row-parallel ones (o, down)."""
    assert g.cfg.tp == 2
    for k, t in tensors.items():
        if k.endswith("lora_A.weight"):
            axis = 1 if (".o_proj." in k or ".down_proj." in k) else 0
            half = t.shape[axis] // 2
            first = t.narrow(axis, 0, half)
            tensors[k] = torch.cat([first, first], dim=axis).contiguous()
            assert not torch.equal(tensors[k], t)


def fault_layer1_missing(tensors, config, g):
    gone = [k for k in tensors if ".layers.1." in k]
    assert gone
    for k in gone:
        del tensors[k]


def fault_lora_b_rounded_bf16(tensors, config, g):
    """lora_B rounded to bf16 and back (the checkpoint and the export hold fp32 values)."""
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for k, t in tensors.items():
        if k.endswith("lora_B.weight"):
            tensors[k] = t.to(torch.bfloat16).float()


# fault: (plant, verification must fail). True: a structural fault, it must be caught. None: lora_B rounded to bf16,
# see test_lora_b_bf16_rounding_is_caught_only_by_the_mean_check.
FAULTS = {
    "kv_lora_B_swapped": (fault_kv_swapped, True),
    "qkv_lora_B_contiguous_split": (fault_qkv_contiguous, True),
    "gate_up_lora_B_swapped": (fault_gate_up_swapped, True),
    "dora_magnitude_dropped": (fault_dora_magnitude_dropped, True),
    "lora_alpha_ignored": (fault_alpha_ignored, True),
    "lora_A_one_tp_shard": (fault_lora_a_one_tp_shard, True),
    "layer_1_missing": (fault_layer1_missing, True),
    "lora_B_rounded_to_bf16": (fault_lora_b_rounded_bf16, None),
}


@dataclass
class MutationResult:
    fault: str
    v: Verified

    def row(self) -> str:
        figures = self.v.figures()
        failing = self.v.failing()
        shown = failing or ["peft_vs_merged_max_abs_diff", "peft_vs_merged_min_cosine"]
        parts = [f"{n}={figures[n]:.3g}" for n in shown if n in figures]
        return f"  {self.fault:<30} exit {self.v.rc}  {'FAILS: ' if failing else 'passes: '}{', '.join(parts)}"


def plant(src: Path, dst: Path, fault, g: Generated) -> Path:
    tensors = load_file(src / "adapter_model.safetensors")
    config = json.loads((src / "adapter_config.json").read_text())
    fault(tensors, config, g)
    dst.mkdir(parents=True)
    save_file(tensors, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def mutations(store) -> dict[str, MutationResult]:
    g = store.gen(MUTATION_SUBJECT)
    results = {}
    # The correct adapter, copied through the same load/save path, must pass.
    for name, fault in [("none (correct export)", lambda *_: None)] + [(k, f) for k, (f, _) in FAULTS.items()]:
        adapter = plant(g.adapter, store.root / "mutants" / name.split()[0], fault, g)
        v = verify(store.binary, g.base, adapter, store.root / "mutants" / f"{name.split()[0]}-run",
                   ckpt=g.written.root)
        results[name] = MutationResult(name, v)
    table = "\n".join(["", f"mutation summary ({MUTATION_SUBJECT}: DoRA, nq 8, ng 2, head_dim 8, TP 2, fp32):"]
                      + [r.row() for r in results.values()])
    print(table)
    # Recorded beside the build, where scripts/test.sh prints it after the run.
    build_dir = os.environ.get("ADAPTER_JOB_BUILD_DIR")
    if build_dir:
        (Path(build_dir) / "verification_mutations.txt").write_text(table.lstrip("\n") + "\n")
    store.mutation_table = table
    return results


def test_correct_adapter_passes(store, mutations):
    v = mutations["none (correct export)"].v
    assert v.rc == 0 and v.failing() == [], store.mutation_table + "\n" + v.stdout
    assert v.figures()["adapter_changes_logits"] > MIN_EFFECT


@pytest.mark.parametrize("fault", [f for f, (_, caught) in FAULTS.items() if caught])
def test_planted_fault_fails_verification(store, mutations, fault):
    v = mutations[fault].v
    assert v.rc == EXIT_FAILED, f"{fault} was not caught (exit {v.rc}):{store.mutation_table}\n{v.stdout}"
    assert v.failing(), f"{fault}: exit 3 but no failing check:{store.mutation_table}"
    assert not v.report["passed"] and "verification PASSED" not in v.stdout


def test_lora_b_rounded_to_bf16_in_an_fp32_file_is_caught(store, mutations):
    """lora_B rounded to bf16 and back, in an fp32 export of fp32 checkpoint values.

    The file claims float32, so the merged variant keeps the checkpoint's float32 values: the rounding is a silent
    precision loss by the exporter (2^-9 relative per element), which must be caught. Thresholds (max |diff| <= 1e-4,
    mean <= 1e-5 of the largest |logit|) sit between float32 noise (a correct export differs by ~0) and this fault
    (measured: max ~1.2e-3, mean ~2.5e-4 of a scale of ~1.2). A legitimate rounding, one the file declares (a bf16
    export of an fp32 checkpoint), passes: see test_bf16_export_of_fp32_checkpoint_passes."""
    r = mutations["lora_B_rounded_to_bf16"]
    figures = {c["name"]: c for c in r.v.report["checks"]}
    print("\n  lora_B rounded to bf16: " + ", ".join(
        f"{n} {c['figure']:.3g} {c['relation']} {c['threshold']:.3g}" for n, c in figures.items()
        if n.startswith("peft_vs_merged")))
    assert figures["peft_vs_merged_max_abs_diff"]["figure"] > 0, f"the rounding changed nothing:{store.mutation_table}"
    assert r.v.rc == EXIT_FAILED, f"bf16 rounding of lora_B: exit {r.v.rc}:{store.mutation_table}"
    assert {"peft_vs_merged_max_abs_diff", "peft_vs_merged_mean_abs_diff"} <= set(r.v.failing()), \
        f"bf16 rounding of lora_B: failing {r.v.failing()}:{store.mutation_table}"


# ---------------------------------------------------------------------------------------------------------------
# 5. HDF5 matches JSON

def test_hdf5_matches_json(real_run):
    v = real_run
    checks, h5 = v.report["checks"], v.h5_checks
    assert h5["name"] == [c["name"] for c in checks]
    assert h5["passed"].tolist() == [int(c["passed"]) for c in checks]
    assert h5["figure"].tolist() == [c["figure"] for c in checks]
    assert h5["threshold"].tolist() == [c["threshold"] for c in checks]
    assert v.h5_passed == int(v.report["passed"]) == 1
    assert len(v.report["prompts"]) == len(v.logits) == 2
    k = v.report["top_k"]
    for i, p in enumerate(v.report["prompts"]):
        assert p["token_ids"] == v.token_ids[i].tolist()
        assert sorted(p["top_k"]) == sorted(v.logits[i]) == ["base", "merged", "peft"]
        for variant, top in p["top_k"].items():
            last = v.logits[i][variant][-1]
            expected = np.argsort(-last, kind="stable")[:k].tolist()
            assert [t["id"] for t in top] == expected, (i, variant)
            assert [t["logit"] for t in top] == last[expected].tolist(), (i, variant)


# ---------------------------------------------------------------------------------------------------------------
# 6. export verifies by default; --no-verify skips; bad input

def test_export_verifies_by_default_and_publishes(store, mb_fixtures, tmp_path):
    out = tmp_path / "adapter"
    proc = adapter_job(store.binary, "export", "--hf-model-id", mb_fixtures / "hf_base", "--megatron-peft-checkpoint",
                       mb_fixtures / "tp2pp2/lora/megatron_ckpt", "--output-hf-path", out, "--verify-device", "cpu",
                       np=2)
    assert "verification PASSED" in proc.stdout and "checks:" in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not Path(f"{out}.unverified").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), list(tmp_path.iterdir())

    # A generated checkpoint too (no tokenizer: the 16 default ids), plain process.
    g = store.gen("lora_rope3_tp2")
    out2 = tmp_path / "generated"
    proc = adapter_job(store.binary, "export", "--hf-model-id", g.base, "--megatron-peft-checkpoint",
                       g.written.iter_dir, "--output-hf-path", out2, "--verify-device", "cpu")
    assert "verification PASSED" in proc.stdout, proc.stdout
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out2 / f).read_bytes() == (g.adapter / f).read_bytes(), f


def test_no_verify_prints_no_table(store):
    for name in CKPTS:
        stdout = store.gen(name).export_stdout
        assert "exported" in stdout, stdout
        assert "checks:" not in stdout and "verification" not in stdout and "PASS" not in stdout, stdout


def test_verify_unverifiable_adapter_exits_3(store, tmp_path):
    g = store.gen(MUTATION_SUBJECT)
    bad = plant(g.adapter, tmp_path / "kv", fault_kv_swapped, g)
    proc = adapter_job(store.binary, "verify", "--hf-model-id", g.base, "--hf-adapter-path", bad,
                       "--megatron-peft-checkpoint", g.written.iter_dir, "--verify-device", "cpu", check=False)
    assert proc.returncode == EXIT_FAILED, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "verification PASSED" not in proc.stdout, proc.stdout


def test_verify_missing_adapter_dir_exits_2(store, mb_fixtures, tmp_path):
    missing = tmp_path / "no_such_adapter"
    proc = adapter_job(store.binary, "verify", "--hf-model-id", mb_fixtures / "hf_base", "--hf-adapter-path",
                       missing, "--verify-device", "cpu", check=False)
    assert str(missing) in proc.stderr, proc.stdout + proc.stderr
    # README: 2 = bad input (usage, a damaged or inconsistent checkpoint, model or config file).
    assert proc.returncode == EXIT_BAD_INPUT, f"exit {proc.returncode}, not 2: {proc.stderr}"


def test_bf16_export_of_fp32_checkpoint_passes(store, tmp_path):
    """A rounding the file declares is legitimate: the merged variant rounds the checkpoint's float32 tensors to
    the file's bf16 before merging, so the default verification publishes the bf16 export."""
    g = store.gen(MUTATION_SUBJECT)
    out = tmp_path / "bf16"
    proc = adapter_job(store.binary, "export", "--hf-model-id", g.base, "--megatron-peft-checkpoint",
                       g.written.root, "--output-hf-path", out, "--dtype", "bf16", "--verify-device", "cpu",
                       check=False)
    assert proc.returncode == 0 and "verification PASSED" in proc.stdout, proc.stdout + proc.stderr
    assert (out / "adapter_model.safetensors").exists()


def test_without_a_tokenizer_or_prompt_the_ids_are_called_synthetic(adapter_job_bin, tmp_path):
    """A base model without tokenizer.json and no --prompt: verification runs on ids spread over the vocabulary, and
    says so (the table and the report), rather than showing them as ids someone gave."""
    base = build_tiny_llama(TinyLlamaConfig(), tmp_path / "base")
    assert not (base / "tokenizer.json").exists()
    written = write_checkpoint(CheckpointConfig(out=tmp_path / "ckpt", base_model=base))
    report = tmp_path / "export.json"
    proc = adapter_job(adapter_job_bin, "export", "--hf-model-id", base, "--megatron-peft-checkpoint", written.root,
                       "--output-hf-path", tmp_path / "out", "--verify-device", "cpu", "--report", report)
    assert "(synthetic token ids, the base model has no tokenizer.json: " in proc.stdout, proc.stdout
    prompts = json.loads(report.read_text())["verification"]["prompts"]
    assert len(prompts) == 1 and prompts[0]["synthetic"] is True and prompts[0]["prompt"] == ""
    given = verify(adapter_job_bin, base, tmp_path / "out", tmp_path / "given", [torch.tensor([[3, 5, 7]])])
    assert "synthetic" not in given.report["prompts"][0] and "(token ids: 3 5 7)" in given.stdout
