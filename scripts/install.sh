#!/usr/bin/env bash
# Installs what adapter_job needs to build and test on Debian 12: Debian packages and pinned
# PyPI packages. Idempotent: a second run installs nothing and takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin
  libhdf5-dev nlohmann-json3-dev libboost-program-options-dev
  libgtest-dev libgmock-dev libyaml-cpp-dev libfmt-dev libzstd-dev libpcre2-dev libutf8proc-dev libssl-dev
  clang-14 libclang-rt-14-dev clang-format
  slurm-wlm munge shellcheck
)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "install: apt packages: ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" - <<'PY' 2>/dev/null; then
import importlib.metadata as md, pathlib, re, sys
for line in pathlib.Path("scripts/requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    installed = md.version(name)
    if version and installed.split("+")[0] != version:
        sys.exit(1)
PY
  echo "install: pip packages from scripts/requirements.txt"
  "$PYTHON" -m pip install -q --disable-pip-version-check -r scripts/requirements.txt
fi

if [[ ! -d /usr/local/cuda ]]; then
  echo "install: note: no CUDA toolkit in /usr/local/cuda; the NCCL backend will not be built"
fi
