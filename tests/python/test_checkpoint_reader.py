"""Our checkpoint reader against torch's own reading of the same bytes.

Checkpoints come from two independent writers: Megatron-Bridge itself (../shared fixtures) and
torch.distributed.checkpoint run inside the test, covering dtypes, a non-contiguous chunk, a
0-d tensor, uneven chunks and non-tensor items.
"""
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from conftest import run
from dcp_helpers import bits, our_index, torch_chunks, torch_index

MB_KEYS = {
    f"decoder.layers.{m}.adapter.{p}.weight"
    for m in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    for p in ("linear_in", "linear_out")
}


def assert_same_bits(ours: dict, reference: dict):
    assert set(ours) == set(reference)
    for name, want in reference.items():
        got = ours[name]
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), name
        assert torch.equal(bits(got), bits(want)), f"{name}: values differ"


def test_inspect_matches_torch_on_megatron_bridge_checkpoints(adapter_job_bin, mb_fixtures):
    for layout in ("tp1pp1", "tp2pp2"):
        top = mb_fixtures / layout / "lora" / "megatron_ckpt"
        reference = torch_index(top / "iter_0000001")
        assert MB_KEYS <= set(reference["tensors"])
        for given in (top, top / "iter_0000001"):  # both directory levels
            ours = our_index(run([adapter_job_bin, "inspect", "--json", given]).stdout)
            assert ours == reference, f"{layout} via {given.name}"


def test_inspect_table_lists_every_key(adapter_job_bin, mb_fixtures):
    out = run([adapter_job_bin, "inspect", mb_fixtures / "tp2pp2/lora/megatron_ckpt"]).stdout
    for key in MB_KEYS:
        assert key in out
    assert "[4, 256, 8]" in out and "16" in out  # fc1 linear_out: 2 chunks per layer per TP rank
    assert "LoRA (megatron.bridge.peft.lora.LoRA) dim 8 alpha 16" in out
    assert "TP 2 PP 2" in out


def test_assembled_adapter_tensors_equal_megatron_bridge_live_parameters(tools_dir, mb_fixtures, tmp_path):
    live = load_file(mb_fixtures / "tp1pp1/lora/megatron_adapter_tensors.safetensors")
    for layout in ("tp1pp1", "tp2pp2"):
        out = tmp_path / f"{layout}.safetensors"
        run([tools_dir / "dcp_dump", mb_fixtures / layout / "lora/megatron_ckpt", out])
        assert_same_bits(load_file(out), live)


def test_every_chunk_decodes_like_torch_load(tools_dir, mb_fixtures, tmp_path):
    ckpt = mb_fixtures / "tp2pp2/lora/megatron_ckpt/iter_0000001"
    out = tmp_path / "chunks.safetensors"
    run([tools_dir / "dcp_dump", ckpt, out, "--chunks"])
    assert_same_bits(load_file(out), torch_chunks(ckpt))


def write_varied_checkpoint(path):
    """One process, plain DCP: the dtypes, layouts and item kinds a reader must handle."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    state = {
        "f32": base.clone(),
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "f64": base.double(),
        "i64": torch.arange(7),
        "transposed": base.t(),  # stored with stride (1, 5): never assume contiguity
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        "step": 12,  # non-tensor leaf: a BYTE_IO item
        "nested": {"lr": 0.5, "names": ["a", "b"]},
    }
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return state


def test_varied_dcp_checkpoint_matches_torch(adapter_job_bin, tools_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    state = write_varied_checkpoint(ckpt)
    assert our_index(run([adapter_job_bin, "inspect", "--json", ckpt]).stdout) == torch_index(ckpt)

    chunks = tmp_path / "chunks.safetensors"
    run([tools_dir / "dcp_dump", ckpt, chunks, "--chunks"])
    reference = torch_chunks(ckpt)
    assert reference["transposed@0,0"].stride() == (1, 5), "the test must cover a non-contiguous chunk"
    assert_same_bits(load_file(chunks), reference)

    whole = tmp_path / "whole.safetensors"
    run([tools_dir / "dcp_dump", ckpt, whole])
    expected = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert_same_bits(load_file(whole), expected)


def test_generated_multi_rank_checkpoints_match_torch(adapter_job_bin, tools_dir, tmp_path):
    """Checkpoints written by four gloo ranks in Megatron's layout, stacked and per-layer keys."""
    from megatron_checkpoint import CheckpointConfig, write_checkpoint

    for name, extra in (("lora", {}), ("dora_per_layer", {"kind": "dora", "per_layer_keys": True})):
        written = write_checkpoint(CheckpointConfig(out=tmp_path / name, tp=2, pp=2, **extra))
        assert our_index(run([adapter_job_bin, "inspect", "--json", written.root]).stdout) == \
            torch_index(written.iter_dir)
        table = run([adapter_job_bin, "inspect", written.root]).stdout
        ours = {k: v for k, v in load_file(dump(tools_dir, written.root, tmp_path / name)).items()
                if ".adapter." in k}
        assert "TP 2 PP 2" in table and all(key in table for key in ours)
        if extra.get("per_layer_keys"):  # stack decoder.layers.<i>.x into decoder.layers.x to compare
            stacked = {}
            for key in written.tensors:
                rest = key.removeprefix("decoder.layers.")
                stacked[key] = torch.stack([ours[f"decoder.layers.{i}.{rest}"] for i in range(4)])
            ours = stacked
        assert_same_bits(ours, written.tensors)


def dump(tools_dir, ckpt, out_stem):
    out = out_stem.with_suffix(".safetensors")
    run([tools_dir / "dcp_dump", ckpt, out])
    return out
