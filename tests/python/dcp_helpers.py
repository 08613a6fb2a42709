"""Reading DCP checkpoints with torch itself: the independent reference our C++ reader is held to."""
import io
import json
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata


def torch_index(ckpt_dir: Path) -> dict:
    """`.metadata` as torch's FileSystemReader sees it, in the shape of `adapter_job inspect --json`."""
    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    tensors, items = {}, {}
    for key, entry in meta.state_dict_metadata.items():
        if isinstance(entry, BytesStorageMetadata):
            info = meta.storage_data[next(i for i in meta.storage_data if i.fqn == key)]
            items[key] = (info.relative_path, info.offset, info.length)
            continue
        assert isinstance(entry, TensorStorageMetadata)
        chunks = []
        for chunk in entry.chunks:
            info = next(v for k, v in meta.storage_data.items()
                        if k.fqn == key and k.offset is not None and list(k.offset) == list(chunk.offsets))
            chunks.append((tuple(chunk.offsets), tuple(chunk.sizes), info.relative_path, info.offset, info.length))
        tensors[key] = (str(entry.properties.dtype).removeprefix("torch."), tuple(entry.size), sorted(chunks))
    return {"tensors": tensors, "bytes_items": items}


def our_index(inspect_json: str) -> dict:
    """The same shape, from `adapter_job inspect --json`."""
    doc = json.loads(inspect_json)
    tensors = {}
    for t in doc["tensors"]:
        chunks = [(tuple(c["offsets"]), tuple(c["sizes"]), c["storage"]["file"], c["storage"]["offset"],
                   c["storage"]["length"]) for c in t["chunks"]]
        tensors[t["key"]] = (t["dtype"], tuple(t["shape"]), sorted(chunks))
    items = {b["key"]: (b["storage"]["file"], b["storage"]["offset"], b["storage"]["length"])
             for b in doc["bytes_items"]}
    return {"tensors": tensors, "bytes_items": items}


def torch_chunks(ckpt_dir: Path) -> dict:
    """Every tensor chunk decoded by torch.load from its [offset, offset+length) bytes."""
    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    out = {}
    for index, info in meta.storage_data.items():
        if index.offset is None:
            continue
        with open(Path(ckpt_dir) / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        name = f"{index.fqn}@" + ",".join(str(o) for o in index.offset)
        out[name] = torch.load(io.BytesIO(blob), weights_only=True)
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """A view that compares bit patterns, so -0.0 != 0.0 and NaN payloads count."""
    t = t.contiguous()
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.reshape(-1).view(width) if t.numel() else t.reshape(-1).to(torch.int64)
