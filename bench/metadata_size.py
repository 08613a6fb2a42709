"""The `.metadata` a Megatron-Bridge LoRA checkpoint of a given shape would have, without writing one.

Uses tests/fixtures/megatron_checkpoint.py's own layout (adapter_params, rank_blocks, stage_layers, byte_items)
and torch's DCP metadata classes, pickled as torch's FileSystemWriter pickles them, so that size limits can be set
from checkpoints far larger than this machine can write (a DeepSeek-V3-sized MoE on 1024 ranks):

    python bench/metadata_size.py --out /tmp/ds3.metadata --deepseek-v3

Storage offsets and lengths are plausible (chunk bytes plus torch.save's ~1.2 KB zip overhead), not exact.
"""
from __future__ import annotations

import argparse
import math
import pickle
import sys
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.filesystem import _StorageInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
import megatron_checkpoint as mc  # noqa: E402

TORCH_SAVE_OVERHEAD = 1200


def build(cfg: mc.CheckpointConfig) -> Metadata:
    params = mc.adapter_params(cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    item = torch.empty((), dtype=dtype).element_size()
    size = mc.stage_size(cfg)
    state, storage = {}, {}
    tensors = {p.name: TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size([cfg.num_layers, *p.shape]), [])
               for p in params}
    for stage in range(cfg.pp):
        for s in range(size):
            rank, offset = stage * size + s, 0
            path = f"__{rank}_0.distcp"
            for key, data in mc.byte_items(cfg, stage, s).items():
                state[key] = BytesStorageMetadata()
                storage[MetadataIndex(key)] = _StorageInfo(path, offset, len(data))
                offset += len(data)
            for p in params:
                for layer in mc.stage_layers(cfg, stage):
                    for offsets, sizes in mc.rank_blocks(cfg, p, s):
                        offsets, sizes = torch.Size([layer, *offsets]), torch.Size([1, *sizes])
                        tensors[p.name].chunks.append(ChunkStorageMetadata(offsets, sizes))
                        length = math.prod(sizes) * item + TORCH_SAVE_OVERHEAD
                        storage[MetadataIndex(mc.STACK + p.name, offsets)] = _StorageInfo(path, offset, length)
                        offset += length
    state.update({mc.STACK + name: t for name, t in tensors.items()})
    return Metadata(state_dict_metadata=state, planner_data=None, storage_data=storage)


# 61 layers rounded up to 64 so that they split over PP16 (DeepSeek-V3 trains on uneven stages).
DEEPSEEK_V3 = dict(num_layers=64, hidden=7168, heads=128, query_groups=128, head_dim=128, ffn=18432, dim=64,
                   experts=256, expert_ffn=2048, topk=8, tp=1, pp=16, ep=64, etp=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--deepseek-v3", action="store_true",
                    help="61 layers, 256 experts (shared adapters, one chunk per expert slot), PP16 x EP64")
    ap.add_argument("--etp", type=int, help="expert tensor parallel size (default 1)")
    args = ap.parse_args()
    cfg = mc.CheckpointConfig(out=args.out.parent, **(DEEPSEEK_V3 if args.deepseek_v3 else {}))
    if args.etp:
        cfg.etp = args.etp
        cfg.tp = max(cfg.tp, 1)
    meta = build(cfg)
    data = pickle.dumps(meta)
    args.out.write_bytes(data)
    chunks = sum(len(t.chunks) for t in meta.state_dict_metadata.values() if isinstance(t, TensorStorageMetadata))
    print(f"{args.out}: {len(data)} bytes, {chunks} chunks, {len(meta.storage_data)} storage entries")


if __name__ == "__main__":
    main()
