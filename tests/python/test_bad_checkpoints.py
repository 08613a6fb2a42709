"""Damaged and hostile checkpoints: each fails with one clear message naming the file (and the
tensor key where there is one), exit code 2, and no crash. CI also runs this file against the
ASan+UBSan build."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from torch.distributed.checkpoint import FileSystemReader

from conftest import run

FC1_OUT = "decoder.layers.mlp.linear_fc1.adapter.linear_out.weight"


@pytest.fixture
def ckpt(mb_fixtures, tmp_path):
    """A writable copy of Megatron-Bridge's TP2xPP2 checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(mb_fixtures / "tp2pp2/lora/megatron_ckpt", dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dst / "iter_0000001"


def chunk_location(iter_dir, key):
    meta = FileSystemReader(str(iter_dir)).read_metadata()
    index, info = next((i, v) for i, v in meta.storage_data.items() if i.fqn == key and i.offset is not None)
    return iter_dir / info.relative_path, info.offset, info.length


def expect_failure(cmd, *fragments):
    proc = run(cmd, check=False)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    for fragment in fragments:
        assert str(fragment) in proc.stderr, f"missing {fragment!r} in:\n{proc.stderr}"
    assert proc.stderr.count("error:") == 1 and "internal error" not in proc.stderr
    return proc.stderr


def test_truncated_shard(tools_dir, ckpt, tmp_path):
    path, offset, length = chunk_location(ckpt, FC1_OUT)
    with open(path, "r+b") as f:
        f.truncate(offset + length // 2)
    expect_failure([tools_dir / "dcp_dump", ckpt, tmp_path / "o.safetensors"], path, "truncated",
                   "decoder.layers.")


def test_broken_central_directory(tools_dir, ckpt, tmp_path):
    path, offset, length = chunk_location(ckpt, FC1_OUT)
    data = bytearray(path.read_bytes())
    cd = data.find(b"PK\x01\x02", offset, offset + length)
    assert cd > 0
    data[cd:cd + 4] = b"XXXX"
    path.write_bytes(bytes(data))
    expect_failure([tools_dir / "dcp_dump", ckpt, tmp_path / "o.safetensors"], path, FC1_OUT,
                   "central directory")


def test_missing_shard_file(tools_dir, ckpt, tmp_path):
    (ckpt / "__3_0.distcp").unlink()
    expect_failure([tools_dir / "dcp_dump", ckpt, tmp_path / "o.safetensors"], ckpt / "__3_0.distcp", "missing")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_metadata"])
def test_bad_metadata(adapter_job_bin, ckpt, damage):
    meta = ckpt / ".metadata"
    data = meta.read_bytes()
    meta.write_bytes({
        "truncated": data[: len(data) // 3],
        "garbage": os.urandom(4096),
        "empty": b"",
        "not_metadata": pickle.dumps({"hello": [1, 2, 3]}, protocol=4),
    }[damage])
    expect_failure([adapter_job_bin, "inspect", ckpt], meta)


def hostile_metadata(iter_dir, marker, module, name, command):
    """The real Metadata re-pickled (protocol 2) with an extra field whose unpickling would call
    module.name(command) in Python."""
    class Hostile:
        def __reduce__(self):
            return (print, (command,))

    meta = FileSystemReader(str(iter_dir)).read_metadata()
    meta.planner_data = Hostile()
    # Protocol 2 spells builtins the Python 2 way.
    data = pickle.dumps(meta, protocol=2).replace(b"c__builtin__\nprint\n", f"c{module}\n{name}\n".encode())
    assert f"c{module}\n{name}\n".encode() in data
    (iter_dir / ".metadata").write_bytes(data)


@pytest.mark.parametrize("module,name,command", [
    ("os", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
])
def test_hostile_pickle_stays_inert(adapter_job_bin, ckpt, tmp_path, module, name, command):
    marker = tmp_path / "pwned"
    hostile_metadata(ckpt, marker, module, name, command.format(marker=str(marker)))

    # The payload is live: Python's own unpickler runs it.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(ckpt / '.metadata')!r}, 'rb'))"],
                   check=True)
    assert marker.exists(), "the hostile pickle should execute under Python's pickle"
    marker.unlink()

    # Ours reads the checkpoint and runs nothing.
    out = run([adapter_job_bin, "inspect", ckpt]).stdout
    assert FC1_OUT in out
    assert not marker.exists()

    # A hostile object in place of the whole Metadata is an error, still inert.
    (ckpt / ".metadata").write_bytes(
        pickle.dumps(0, protocol=2).replace(b"K\x00", f"c{module}\n{name}\n(V{command.format(marker=str(marker))}\ntR".encode()))
    expect_failure([adapter_job_bin, "inspect", ckpt], ckpt / ".metadata", f"{module}.{name}")
    assert not marker.exists()
