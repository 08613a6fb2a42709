"""`adapter_job export` checks the checkpoint's integrity.json ({"algorithm": "sha256", "files": {name: hex}},
as Megatron core >= 0.18 writes it) before it reads anything else: each rank hashes its share of the files, and a
mismatch, a missing file or a manifest that is not sha256 is bad input (exit 2) naming the file and both digests.
Digests checked against hashlib."""
import hashlib
import json
from pathlib import Path

import pytest

from conftest import run
from test_export_bad_input import expect_bad_input, export, writable_copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ckpt(mb_fixtures, tmp_path):
    ckpt = writable_copy(mb_fixtures / "tp2pp2/lora/megatron_ckpt", tmp_path / "ckpt")
    iter_dir = ckpt / "iter_0000001"
    files = {p.name: sha256(p) for p in sorted(iter_dir.iterdir()) if p.is_file()}
    (iter_dir / "integrity.json").write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=2))
    return ckpt


@pytest.fixture
def outdir(tmp_path):
    (tmp_path / "outputs").mkdir()
    return tmp_path / "outputs" / "adapter"


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "iter_0000001/integrity.json").read_text())


def rewrite(ckpt: Path, change) -> None:
    m = manifest(ckpt)
    change(m)
    (ckpt / "iter_0000001/integrity.json").write_text(json.dumps(m))


def test_a_good_manifest_is_checked_and_reported(adapter_job_bin, mb_fixtures, ckpt, outdir, tmp_path):
    report = tmp_path / "report.json"
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", ckpt, outdir, "--no-verify", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["integrity"] == {"checked": True, "files": len(manifest(ckpt)["files"])}


# Eight files in name order, shared round-robin by 4 ranks: each of these is checked by another rank.
@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp", "run_config.yaml", "__2_0.distcp"])
@pytest.mark.parametrize("np", [4, 1])
def test_a_damaged_file_is_named_with_both_digests(adapter_job_bin, mb_fixtures, ckpt, outdir, name, np):
    """Before: the binary never looked at the digests; a flipped byte in a shard's unused tail went unnoticed."""
    damaged = ckpt / "iter_0000001" / name
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0x01
    damaged.write_bytes(bytes(data))
    proc = export(adapter_job_bin, np, mb_fixtures / "hf_base", ckpt, outdir, timeout=60)
    expect_bad_input(proc, outdir, f"'{damaged}' does not match", hashlib.sha256(bytes(data)).hexdigest(),
                     manifest(ckpt)["files"][name])


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.update(algorithm="md5"), "algorithm is 'md5'; only \"sha256\""),
    (lambda m: m["files"].update({"__1_0.distcp": hashlib.md5(b"x").hexdigest()}),
     "files.'__1_0.distcp' is '9dd4e461268c8034f5c8564e155c67a6', not a sha256 digest"),
    (lambda m: m["files"].update({"../ckpt/iter_0000001/.metadata": "0" * 64}),
     "files.'../ckpt/iter_0000001/.metadata' is not a path inside the iteration directory"),
    (lambda m: m["files"].update({"/etc/hostname": "0" * 64}), "files.'/etc/hostname' is not a path inside"),
    (lambda m: m["files"].update({"__9_0.distcp": "0" * 64}), "__9_0.distcp' is missing"),
    (lambda m: m.update(files={}), "files lists no file"),
])
def test_a_manifest_that_cannot_vouch_is_rejected(adapter_job_bin, mb_fixtures, ckpt, outdir, change, fragment):
    rewrite(ckpt, change)
    proc = export(adapter_job_bin, 4, mb_fixtures / "hf_base", ckpt, outdir, timeout=60)
    expect_bad_input(proc, outdir, "integrity.json", fragment)


def test_no_integrity_check(adapter_job_bin, mb_fixtures, ckpt, outdir, tmp_path):
    rewrite(ckpt, lambda m: m.update(algorithm="md5"))
    report = tmp_path / "report.json"
    proc = export(adapter_job_bin, 2, mb_fixtures / "hf_base", ckpt, outdir, "--no-verify", "--no-integrity-check",
                  "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["integrity"] == {"checked": False, "why": "--no-integrity-check"}


def test_without_a_manifest_the_report_says_so(adapter_job_bin, mb_fixtures, ckpt, outdir, tmp_path):
    (ckpt / "iter_0000001/integrity.json").unlink()
    report = tmp_path / "report.json"
    proc = run([adapter_job_bin, "export", "--hf-model-id", mb_fixtures / "hf_base", "--megatron-peft-checkpoint",
                ckpt, "--output-hf-path", outdir, "--no-verify", "--report", report], check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["integrity"] == {"checked": False,
                                                           "why": "the checkpoint has no integrity.json"}
