#!/usr/bin/env bash
# Builds the libFuzzer targets (clang-14, ASan + UBSan) and runs each for FUZZ_SECONDS (default
# 60), seeded with real files: the .metadata pickles, torch.save archives and safetensors files of
# Megatron-Bridge's checkpoints in ../shared/fixtures, plus a few torch.save archives and
# safetensors files made here by torch itself. The corpus lives in build-fuzz/corpus (seeds and
# what the run adds, at most 256 KiB an input); a finding is left in build-fuzz/artifacts
# and fails the script.
#   scripts/fuzz.sh [target ...]    (default: pickle dcp_metadata zip safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-60}
SHARED=${ADAPTER_JOB_SHARED:-../shared}
FIXTURES=$SHARED/fixtures/megatron-bridge
BUILD=build-fuzz
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(pickle dcp_metadata zip safetensors)

mkdir -p "$BUILD"
CC=clang-14 CXX=clang++-14 cmake -S . -B "$BUILD" -DADAPTER_JOB_FUZZ=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD/configure.log" 2>&1 ||
  { cat "$BUILD/configure.log"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" >/dev/null

seeds=$BUILD/seeds
rm -rf "$seeds" && mkdir -p "$seeds"/{pickle,zip,safetensors}
[[ -d $FIXTURES ]] || { echo "fuzz: no fixtures at $FIXTURES" >&2; exit 1; }
i=0
while IFS= read -r -d '' f; do cp "$f" "$seeds/pickle/metadata-$((i++))"; done \
  < <(find "$FIXTURES" -name .metadata -size -256k -print0)
while IFS= read -r -d '' f; do cp "$f" "$seeds/safetensors/st-$((i++))"; done \
  < <(find "$FIXTURES" -name '*.safetensors' -size -256k -print0)
# torch.save archives (the chunks inside the fixtures' .distcp files, and a few made here), and
# the pickles inside them.
python3 - "$FIXTURES" "$seeds" <<'PY'
import io, sys, pathlib, zipfile, torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
fixtures, seeds = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
n = 0
for meta in sorted(fixtures.rglob(".metadata"))[:4]:
    md = FileSystemReader(str(meta.parent)).read_metadata()
    for info in list(md.storage_data.values())[:8]:
        blob = (meta.parent / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        if blob[:2] == b"PK" and len(blob) < 256 << 10:
            (seeds / "zip" / f"chunk-{n}").write_bytes(blob); n += 1
            with zipfile.ZipFile(io.BytesIO(blob)) as z:  # its data.pkl: a pickle seed
                pkl = next(m for m in z.namelist() if m.endswith("data.pkl"))
                (seeds / "pickle" / f"data-{n}.pkl").write_bytes(z.read(pkl))
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
for name, t in {"f32": base, "bf16": base.bfloat16(), "view": base[1:, 2:], "t": base.t(),
                "i64": torch.arange(5), "empty": torch.empty(0, 3)}.items():
    torch.save(t, seeds / "zip" / f"torch-{name}")
    save_file({"a": t.contiguous().clone(), "b": base.clone()}, seeds / "safetensors" / f"made-{name}",
              metadata={"format": "pt"})
PY

mkdir -p "$BUILD/artifacts"
status=0
for target in "${targets[@]}"; do
  case $target in
    pickle | dcp_metadata) kind=pickle ;;
    zip) kind=zip ;;
    safetensors) kind=safetensors ;;
    *) echo "fuzz: unknown target '$target'" >&2; exit 2 ;;
  esac
  corpus=$BUILD/corpus/$target
  mkdir -p "$corpus"
  echo "fuzz_$target: ${SECONDS_EACH}s from $(find "$seeds/$kind" -type f | wc -l) seeds"
  if ! "$BUILD/tests/fuzz/fuzz_$target" "$corpus" "$seeds/$kind" -max_total_time="$SECONDS_EACH" \
      -max_len=262144 -timeout=10 -rss_limit_mb=2048 -artifact_prefix="$BUILD/artifacts/$target-" \
      -print_final_stats=1 >"$BUILD/$target.log" 2>&1; then
    echo "fuzz_$target FOUND A PROBLEM (input in $BUILD/artifacts; once fixed, copy it to"
    echo "tests/fuzz/regressions/$target/, where ctest's fuzz.replay.$target replays it on every build):"
    grep -E "ERROR|SUMMARY|==[0-9]+==|runtime error|deadly signal" "$BUILD/$target.log" | head -20
    status=1
  else
    grep -E "stat::number_of_executed_units|stat::new_units_added" "$BUILD/$target.log" | tr '\n' ' '
    echo
  fi
done
exit $status
