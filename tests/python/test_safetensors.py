"""Our safetensors reader and writer against the reference implementation (safetensors.torch)."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run
from dcp_helpers import bits


def varied_tensors():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    return {
        "model.layers.10.w": x,
        "model.layers.2.w": x * 2,
        "bf16": x.to(torch.bfloat16),
        "f16": x.to(torch.float16),
        "f64": x.double(),
        "i64": torch.arange(5),
        "i32": torch.arange(4, dtype=torch.int32),
        "u8": torch.arange(3, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "f8": x.to(torch.float8_e4m3fn),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "unicodé": torch.ones(2),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_copy_is_byte_identical_to_reference_writer(tools_dir, tmp_path, metadata):
    tensors = varied_tensors()
    python_file = tmp_path / "python.safetensors"
    save_file(tensors, python_file, metadata=metadata)
    ours = tmp_path / "ours.safetensors"
    extra = [a for k, v in (metadata or {}).items() for a in ("--metadata", f"{k}={v}")]
    run([tools_dir / "safetensors_copy", python_file, ours, *extra])
    assert ours.read_bytes() == python_file.read_bytes()
    loaded = load_file(ours)
    for name, want in tensors.items():
        assert loaded[name].dtype == want.dtype and torch.equal(bits(loaded[name]), bits(want)), name


def test_refuses_to_overwrite(tools_dir, tmp_path):
    src = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(2)}, src)
    dst = tmp_path / "b.safetensors"
    dst.write_text("keep me")
    proc = run([tools_dir / "safetensors_copy", src, dst], check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert dst.read_text() == "keep me"


def write_raw(path, header: dict, data: bytes, declared_length=None):
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", declared_length or len(body)) + body + data)


@pytest.mark.parametrize("case,expected", [
    ("huge_header", "exceeds the 100000000-byte limit"),
    ("overlap", "tensor 'b' starts at data offset 4, expected 8"),
    ("trailing", "tensors end at byte"),
    ("duplicate", "names 'a' twice"),
    ("truncated_header", "runs past"),
])
def test_bad_files_fail_with_file_and_key(tools_dir, tmp_path, case, expected):
    bad = tmp_path / f"{case}.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if case == "huge_header":
        write_raw(bad, {"a": entry}, b"\0" * 8, declared_length=200_000_000)
    elif case == "overlap":
        write_raw(bad, {"a": entry, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "trailing":
        write_raw(bad, {"a": entry}, b"\0" * 9)
    elif case == "duplicate":
        body = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
        bad.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    elif case == "truncated_header":
        write_raw(bad, {"a": entry}, b"", declared_length=5000)
    proc = run([tools_dir / "safetensors_copy", bad, tmp_path / "out.safetensors"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
    # The reference loader rejects the same files (duplicate keys it silently accepts).
    if case != "duplicate":
        with pytest.raises(Exception):
            load_file(bad)
