"""Shared pytest fixtures: where the binaries, the generators and the ground-truth data live.

The C++ build exports ADAPTER_JOB_BIN and ADAPTER_JOB_TOOLS through ctest; running pytest by hand
falls back to ./build. Megatron-Bridge's own checkpoints live in ../shared beside the clone, as in
CI: a missing copy is an error, never a skip.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
sys.path.insert(0, str(REPO / "tests" / "python"))


def _build_dir() -> Path:
    return Path(os.environ.get("ADAPTER_JOB_BUILD_DIR", REPO / "build"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def adapter_job_bin() -> Path:
    path = Path(os.environ.get("ADAPTER_JOB_BIN", _build_dir() / "src" / "cli" / "adapter_job"))
    if not path.exists():
        pytest.fail(f"adapter_job binary not found at {path}: build first (scripts/build.sh)")
    return path


@pytest.fixture(scope="session")
def tools_dir() -> Path:
    path = Path(os.environ.get("ADAPTER_JOB_TOOLS", _build_dir() / "tests" / "tools"))
    if not path.exists():
        pytest.fail(f"test tools not found in {path}: build first (scripts/build.sh)")
    return path


@pytest.fixture(scope="session")
def mb_fixtures() -> Path:
    """Megatron-Bridge's real checkpoints and exports (see its README.md)."""
    path = Path(os.environ.get("ADAPTER_JOB_SHARED", REPO.parent / "shared")) / "fixtures" / "megatron-bridge"
    if not (path / "README.md").exists():
        pytest.fail(f"Megatron-Bridge fixtures missing at {path}: CI lays ../shared beside the clone")
    return path


def run(cmd, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, capturing text output; on an unexpected exit code shows what it printed."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
