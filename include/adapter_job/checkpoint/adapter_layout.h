// Which adapter tensors a Megatron checkpoint holds, layer by layer, and which training shard wrote
// each chunk: a pipeline stage pp and a slot within it, the tensor-parallel rank for dense
// modules and (expert-parallel rank, expert-TP rank) for MoE experts. Every rank computes the same
// layout from `.metadata` alone, so no sizes ever need to be exchanged.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "adapter_job/checkpoint/dcp_metadata.h"
#include "adapter_job/checkpoint/run_directory.h"

namespace adapter_job::checkpoint {

enum class AdapterParam { kLinearIn, kLinearOut, kMagnitude };
std::string_view AdapterParamName(AdapterParam param);

// "decoder.layers[.<i>].<module>.adapter[.<canonical>].<param>", or a multi-token prediction
// layer's "mtp.layers.<i>.mtp_model_layer.<module>.adapter..." (Megatron-LM before 0.14:
// "transformer_layer").
struct AdapterKey {
  std::string module;     // e.g. "self_attention.linear_qkv"
  std::string canonical;  // CanonicalLoRA's "adapter_q" etc.; empty otherwise
  AdapterParam param = AdapterParam::kLinearIn;
  std::optional<int64_t> layer;  // per-layer keys carry the layer; stacked keys do not
  // MTP layer i, which PlanAdapterLayout numbers num_layers + i, as the HF checkpoints of
  // DeepSeek-V3 and GLM-4.5 store it (model.layers.61 after DeepSeek-V3's 61 decoder layers).
  std::optional<int64_t> mtp_layer;
  // A Mamba mixer's in_proj linear_out is saved as five tensors, "linear_out.weight.z", ".x",
  // ".B", ".C" and ".dt" (megatron-core ssm/utils.py _split_tensor_factory, called from
  // Megatron-Bridge peft/utils.py ParallelLinearAdapter.sharded_state_dict): each a global tensor
  // of its own, TP-sharded along its rows. Their position in kSplitParts; empty otherwise.
  std::string split;
};

// The parts of a split tensor in the order they make the whole one: in_proj's output [z; x; B; C;
// dt], which is also transformers' order (NemotronHMamba2Mixer splits in_proj's output so).
inline constexpr std::array<std::string_view, 5> kSplitParts = {"z", "x", "B", "C", "dt"};

// nullopt for keys that are not adapter weights (base weights, optimizer state, RNG state);
// throws FormatError for an adapter key whose structure we do not know.
std::optional<AdapterKey> ParseAdapterKey(std::string_view fqn);

// True for the modules of a layer's MoE experts ("mlp.experts.experts.linear_fc1"; Megatron's
// grouped and sequential expert MLPs both save under that doubled name).
bool IsExpertModule(std::string_view module);

// One adapter tensor as seen from one layer: its per-layer shape (the stacked axis removed). The
// layout refers to `.metadata` by index, never by pointer, so a layout and the metadata it was
// planned from move independently (see MetaOf).
struct LayerTensor {
  std::size_t meta_index = 0;  // into DcpMetadata::tensors (a split tensor's first part)
  std::string fqn;             // a split tensor's without the part's suffix
  DType dtype = DType::kFloat32;
  AdapterKey key;
  // Expert modules: [experts, ...] since Megatron-Bridge 0.5.1 (per-expert adapters, or a shared
  // one saved once per expert slot); 0 for a tensor without that axis (dense modules, and the
  // shared expert adapters of older versions, which stand for every expert).
  int64_t experts = 0;
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  uint64_t offset_in_layer = 0;  // byte offset of this tensor in the assembled layer buffer
};

// One stored chunk of one layer tensor and the training shard that owns it.
struct LayerChunk {
  std::size_t tensor_index = 0;  // into LayerLayout::tensors
  // The `.metadata` tensor holding the chunk: the layer tensor's own, or for a split tensor
  // (AdapterKey::split) the part's, whose rows offsets_in_layer places in the whole.
  std::size_t meta_index = 0;
  std::size_t chunk_index = 0;  // into that TensorMeta::chunks
  int slot = 0;                 // the shard within the stage: tp, or ep x ETP + etp for experts
  std::vector<int64_t> offsets_in_layer;  // chunk offsets with the stacked axis removed
  std::vector<int64_t> sizes_in_layer;
  uint64_t nbytes = 0;
};

struct LayerLayout {
  int64_t layer = 0;  // global layer index
  int pp_stage = 0;
  std::vector<LayerTensor> tensors;  // sorted by key
  std::vector<LayerChunk> chunks;    // sorted by (slot, tensor, offsets)
  uint64_t nbytes = 0;               // the assembled layer buffer
};

struct AdapterLayout {
  int tensor_parallel = 1;
  int pipeline_parallel = 1;
  int virtual_pipeline = 1;
  int expert_parallel = 1;
  int expert_tensor_parallel = 1;
  // Shards per stage: TP, or max(TP, EP x ETP) when expert adapters are saved. Megatron gives each
  // stage that many ranks (TP x DP, which EP x ETP divides), and these are the ones that write.
  int slots = 1;
  int64_t num_layers = 0;           // decoder layers
  int64_t mtp_layers = 0;           // MTP layers exported after them (AdapterSelection::mtp_layers)
  std::vector<LayerLayout> layers;  // by global layer index: the decoder's, then the MTP layers
  // Adapter tensors deliberately left out: those of the MTP layers unless asked for (transformers
  // has no module for them) and those under an excluded prefix.
  std::vector<std::string> excluded;
  int shard_count() const { return slots * pipeline_parallel; }
  int ShardOf(int slot, int pp) const { return pp * slots + slot; }
};

// The `.metadata` entries a layout names (`metadata` must be the one it was planned from): a
// layer tensor's (its first part's, if split), and a chunk's and the tensor that holds it.
const TensorMeta& MetaOf(const DcpMetadata& metadata, const LayerTensor& tensor);
const TensorMeta& TensorMetaOf(const DcpMetadata& metadata, const LayerChunk& chunk);
const ChunkMeta& MetaOf(const DcpMetadata& metadata, const LayerChunk& chunk);

// Which adapter tensors an export takes.
struct AdapterSelection {
  // Keys starting with one of these are left out (Megatron-Bridge's --exclude-adapter-base-prefix).
  std::vector<std::string> excluded_prefixes;
  // The MTP layers' adapters (`mtp.layers.<i>.mtp_model_layer.`): taken as layers num_layers + i
  // (--include-mtp-layers), else left out.
  bool mtp_layers = false;
};

// Groups the adapter tensors of `metadata` by layer and assigns each chunk to the shard (slot, pp)
// the training TP x PP (and EP x ETP) of `model` implies, checking the chunk layout agrees with
// it. Adapters left out (`selection`) are listed in `excluded` instead; a prefix that matches no
// adapter is an error (a typo must not pass). MTP layers belong to the last pipeline stage.
AdapterLayout PlanAdapterLayout(const DcpMetadata& metadata, const ModelSettings& model,
                                const AdapterSelection& selection = {});

// The pipeline stage that owns `layer`, as Megatron assigns them (even split, interleaved when
// the virtual pipeline size is above 1).
int StageOfLayer(int64_t layer, int64_t num_layers, int pipeline_parallel, int virtual_pipeline);

}  // namespace adapter_job::checkpoint
