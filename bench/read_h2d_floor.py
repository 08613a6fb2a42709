"""The verification floor: read the base model's safetensors once and copy the bytes to the GPU.

Files are read with plain read() into two pinned 64 MiB buffers, each copied to one device buffer
asynchronously while the other fills, so reading and copying overlap: the best a loader can do. CUDA
start-up is timed apart, before. Prints one JSON line.

    python bench/read_h2d_floor.py MODEL_DIR
"""
import json
import sys
import time
from pathlib import Path

import torch

CHUNK = 64 << 20


def main() -> None:
    files = sorted(Path(sys.argv[1]).glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    cuda_init = time.perf_counter() - t0
    device = torch.empty(total, dtype=torch.uint8, device="cuda")
    pinned = [torch.empty(CHUNK, dtype=torch.uint8).pin_memory() for _ in range(2)]
    views = [memoryview(p.numpy()) for p in pinned]
    done = [None, None]
    t1 = time.perf_counter()
    at, which = 0, 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                if done[which] is not None:
                    done[which].synchronize()  # this buffer's last copy has left it
                n = fh.readinto(views[which])
                if not n:
                    break
                device[at:at + n].copy_(pinned[which][:n], non_blocking=True)
                done[which] = torch.cuda.Event()
                done[which].record()
                at, which = at + n, 1 - which
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t1
    assert at == total
    print(json.dumps({"bytes": total, "cuda_init": cuda_init, "read_h2d": seconds,
                      "gb_per_s": total / seconds / 1e9}))


if __name__ == "__main__":
    main()
