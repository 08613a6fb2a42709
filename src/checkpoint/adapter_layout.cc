#include "adapter_job/checkpoint/adapter_layout.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <map>
#include <set>
#include <span>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::checkpoint {
namespace {

constexpr std::string_view kLayersPrefix = "decoder.layers.";
constexpr std::string_view kMtpPrefix = "mtp.layers.";
constexpr std::string_view kAdapter = ".adapter.";

std::optional<int64_t> ParseIndex(std::string_view text) {
  int64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < 0) return std::nullopt;
  return value;
}

// Which dimension of a per-layer tensor the chunks split, and the shard index of each chunk.
int TensorParallelRank(std::span<const int64_t> shape, std::span<const int64_t> offsets,
                       std::span<const int64_t> sizes, int tp_size, const std::string& fqn,
                       std::string_view size_name = "tensor_model_parallel_size") {
  int split_dim = -1;
  for (std::size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] == shape[d]) continue;
    if (split_dim >= 0) Fail("'{}': chunks split more than one dimension", fqn);
    split_dim = static_cast<int>(d);
  }
  if (split_dim < 0) return 0;  // replicated across TP: written once, by tp rank 0
  const int64_t extent = sizes[static_cast<std::size_t>(split_dim)];
  const int64_t whole = shape[static_cast<std::size_t>(split_dim)];
  const int64_t pieces = extent > 0 ? whole / extent : 0;
  if (extent <= 0 || whole % extent != 0 || (pieces != tp_size && pieces != 2 * tp_size)) {
    Fail(
        "'{}': chunks of {} rows split dimension {} of size {} into {} pieces, which does not "
        "match {} {} (expected {} pieces, or {} for a SwiGLU fc1)",
        fqn, extent, split_dim, whole, extent > 0 ? whole / extent : 0, size_name, tp_size, tp_size,
        2 * tp_size);
  }
  // Megatron's SwiGLU factory stores tp rank i's [gate_i; up_i] as chunks i and i + tp of 2tp.
  return static_cast<int>((offsets[static_cast<std::size_t>(split_dim)] / extent) % tp_size);
}

// The shard within its stage that wrote a chunk. Expert chunks hold whole experts of one
// expert-parallel rank (one expert slot each for a shared adapter, all of the rank's experts for
// per-expert ones), split further by expert TP.
int SlotOf(const LayerTensor& tensor, const std::vector<int64_t>& offsets,
           const std::vector<int64_t>& sizes, const AdapterLayout& layout) {
  const std::string& fqn = tensor.fqn;
  if (!IsExpertModule(tensor.key.module))
    return TensorParallelRank(tensor.shape, offsets, sizes, layout.tensor_parallel, fqn);
  const int etp_size = layout.expert_tensor_parallel;
  // Without an expert axis (shared adapters before Megatron-Bridge 0.5.1) only expert-parallel
  // rank 0's copy is saved.
  constexpr std::string_view kEtp = "expert_tensor_parallel_size";
  if (tensor.experts == 0)
    return TensorParallelRank(tensor.shape, offsets, sizes, etp_size, fqn, kEtp);
  if (tensor.experts % layout.expert_parallel != 0) {
    Fail("'{}': {} experts do not split over expert_model_parallel_size {}", fqn, tensor.experts,
         layout.expert_parallel);
  }
  const int64_t per_rank = tensor.experts / layout.expert_parallel;
  const int64_t first = offsets[0];
  const int64_t last = offsets[0] + sizes[0] - 1;
  if (first / per_rank != last / per_rank) {
    Fail(
        "'{}': a chunk holds experts {} to {}, across expert-parallel ranks of {} experts each "
        "(expert_model_parallel_size {})",
        fqn, first, last, per_rank, layout.expert_parallel);
  }
  const auto inner = [](const std::vector<int64_t>& v) { return std::span(v).subspan(1); };
  const int etp =
      TensorParallelRank(inner(tensor.shape), inner(offsets), inner(sizes), etp_size, fqn, kEtp);
  return static_cast<int>(first / per_rank) * etp_size + etp;
}

// A split tensor's parts (AdapterKey::split): the whole's rows are theirs one after the other.
struct SplitTensor {
  std::vector<int64_t> shape;                    // the whole, per layer
  std::array<int64_t, kSplitParts.size()> rows;  // each part's first row in the whole
};

std::size_t SplitIndex(std::string_view part) {
  return static_cast<std::size_t>(std::find(kSplitParts.begin(), kSplitParts.end(), part) -
                                  kSplitParts.begin());
}

std::string WithoutSplit(const std::string& fqn, const AdapterKey& key) {
  return key.split.empty() ? fqn : fqn.substr(0, fqn.size() - key.split.size() - 1);
}

}  // namespace

bool IsExpertModule(std::string_view module) { return module.starts_with("mlp.experts."); }

std::string_view AdapterParamName(AdapterParam param) {
  switch (param) {
    case AdapterParam::kLinearIn:
      return "linear_in.weight";
    case AdapterParam::kLinearOut:
      return "linear_out.weight";
    case AdapterParam::kMagnitude:
      return "weight_magnitude";
  }
  return "?";
}

std::optional<AdapterKey> ParseAdapterKey(std::string_view fqn) {
  const auto adapter_at = fqn.find(kAdapter);
  if (adapter_at == std::string_view::npos) return std::nullopt;
  AdapterKey key;
  std::string_view module;
  if (fqn.starts_with(kLayersPrefix)) {
    module = fqn.substr(kLayersPrefix.size(), adapter_at - kLayersPrefix.size());
    if (const auto dot = module.find('.'); dot != std::string_view::npos) {
      if (auto layer = ParseIndex(module.substr(0, dot))) {
        key.layer = layer;
        module.remove_prefix(dot + 1);
      }
    }
  } else if (fqn.starts_with(kMtpPrefix)) {
    // Only the transformer layer inside an MTP block maps to HF modules; eh_proj and the norms
    // around it have no PEFT target.
    module = fqn.substr(kMtpPrefix.size(), adapter_at - kMtpPrefix.size());
    const auto dot = module.find('.');
    const auto layer =
        dot == std::string_view::npos ? std::nullopt : ParseIndex(module.substr(0, dot));
    if (layer) module.remove_prefix(dot + 1);
    std::string_view inner;
    for (std::string_view name : {"mtp_model_layer.", "transformer_layer."}) {
      if (module.starts_with(name)) inner = module.substr(name.size());
    }
    if (!layer || inner.empty()) {
      Fail(
          "adapter '{}' is in an MTP layer but outside its transformer layer "
          "(mtp.layers.<i>.mtp_model_layer.); only transformer-layer adapters can be exported",
          fqn);
    }
    key.layer = layer;
    key.mtp_layer = layer;
    module = inner;
  } else {
    // Optimizer state repeats the parameter names under its own prefix.
    if (fqn.starts_with("optimizer.")) return std::nullopt;
    Fail("adapter '{}' is outside decoder.layers; only transformer-layer adapters can be exported",
         fqn);
  }
  key.module = std::string(module);
  std::string_view rest = fqn.substr(adapter_at + kAdapter.size());
  if (rest.starts_with("adapter_")) {
    const auto dot = rest.find('.');
    if (dot == std::string_view::npos) Fail("adapter key '{}' ends after its adapter name", fqn);
    key.canonical = std::string(rest.substr(0, dot));
    rest.remove_prefix(dot + 1);
  }
  if (constexpr std::string_view kSplitOut = "linear_out.weight."; rest.starts_with(kSplitOut)) {
    const std::string_view part = rest.substr(kSplitOut.size());
    if (std::find(kSplitParts.begin(), kSplitParts.end(), part) == kSplitParts.end()) {
      Fail(
          "adapter key '{}' has an unknown split part '{}' (expected one of z, x, B, C, dt, as "
          "megatron-core splits a Mamba in_proj)",
          fqn, part);
    }
    key.split = std::string(part);
    rest = rest.substr(0, kSplitOut.size() - 1);
  }
  if (rest == "linear_in.weight") {
    key.param = AdapterParam::kLinearIn;
  } else if (rest == "linear_out.weight") {
    key.param = AdapterParam::kLinearOut;
  } else if (rest == "weight_magnitude") {
    key.param = AdapterParam::kMagnitude;
  } else {
    Fail(
        "adapter key '{}' has an unknown parameter '{}' (expected linear_in.weight, "
        "linear_out.weight or weight_magnitude)",
        fqn, rest);
  }
  return key;
}

int StageOfLayer(int64_t layer, int64_t num_layers, int pipeline_parallel, int virtual_pipeline) {
  const int64_t chunks = int64_t{pipeline_parallel} * virtual_pipeline;
  const int64_t per_chunk = num_layers / chunks;
  return static_cast<int>((layer / per_chunk) % pipeline_parallel);
}

const TensorMeta& MetaOf(const DcpMetadata& metadata, const LayerTensor& tensor) {
  return metadata.tensors.at(tensor.meta_index);
}

const TensorMeta& TensorMetaOf(const DcpMetadata& metadata, const LayerChunk& chunk) {
  return metadata.tensors.at(chunk.meta_index);
}

const ChunkMeta& MetaOf(const DcpMetadata& metadata, const LayerChunk& chunk) {
  return TensorMetaOf(metadata, chunk).chunks.at(chunk.chunk_index);
}

AdapterLayout PlanAdapterLayout(const DcpMetadata& metadata, const ModelSettings& model,
                                const AdapterSelection& selection) {
  const std::vector<std::string>& excluded_prefixes = selection.excluded_prefixes;
  AdapterLayout layout;
  layout.tensor_parallel = static_cast<int>(model.tensor_parallel);
  layout.pipeline_parallel = static_cast<int>(model.pipeline_parallel);
  layout.virtual_pipeline = static_cast<int>(model.virtual_pipeline_parallel.value_or(1));
  if (layout.virtual_pipeline < 1) Fail("virtual_pipeline_model_parallel_size must be positive");
  layout.expert_parallel = static_cast<int>(model.expert_parallel);
  layout.expert_tensor_parallel = static_cast<int>(model.expert_tensor_parallel);
  layout.slots = layout.tensor_parallel;

  // Collect adapter tensors and the layer count they imply.
  struct Found {
    std::size_t index;       // into metadata.tensors
    const TensorMeta* meta;  // planning only: the layout keeps the index
    AdapterKey key;
  };
  std::vector<Found> found;
  std::optional<int64_t> stacked_layers;
  int64_t per_layer_count = 0;
  std::vector<bool> prefix_used(excluded_prefixes.size());
  for (std::size_t index = 0; index < metadata.tensors.size(); ++index) {
    const TensorMeta& tensor = metadata.tensors[index];
    const std::string_view fqn = tensor.fqn;
    if (fqn.find(kAdapter) != std::string_view::npos) {
      bool excluded = fqn.starts_with("mtp.") && !selection.mtp_layers;
      for (std::size_t p = 0; p < excluded_prefixes.size(); ++p) {
        if (fqn.starts_with(excluded_prefixes[p])) excluded = prefix_used[p] = true;
      }
      if (excluded) {
        layout.excluded.push_back(tensor.fqn);
        continue;
      }
    }
    auto key = ParseAdapterKey(tensor.fqn);
    if (!key) continue;
    if (key->mtp_layer) {
      layout.mtp_layers = std::max(layout.mtp_layers, *key->mtp_layer + 1);
    } else if (key->layer) {
      per_layer_count = std::max(per_layer_count, *key->layer + 1);
    } else {
      if (tensor.size.empty()) Fail("stacked adapter '{}' has no layer axis", tensor.fqn);
      if (stacked_layers && *stacked_layers != tensor.size[0]) {
        Fail("stacked adapter '{}' has {} layers but others have {}", tensor.fqn, tensor.size[0],
             *stacked_layers);
      }
      stacked_layers = tensor.size[0];
    }
    if (IsExpertModule(key->module)) {
      layout.slots =
          std::max(layout.tensor_parallel, layout.expert_parallel * layout.expert_tensor_parallel);
    }
    found.push_back({index, &tensor, std::move(*key)});
  }
  for (std::size_t p = 0; p < excluded_prefixes.size(); ++p) {
    if (!prefix_used[p])
      Fail("--exclude-adapter-base-prefix '{}' matches no adapter tensor of the checkpoint",
           excluded_prefixes[p]);
  }
  if (found.empty()) Fail("the checkpoint holds no adapter tensors (no key contains '.adapter.')");
  if (selection.mtp_layers && layout.mtp_layers == 0)
    Fail("--include-mtp-layers: the checkpoint holds no MTP layer adapters (mtp.layers.<i>.)");
  layout.num_layers =
      model.num_layers.value_or(std::max(stacked_layers.value_or(0), per_layer_count));
  if (stacked_layers && *stacked_layers != layout.num_layers) {
    Fail("stacked adapters have {} layers but run_config.yaml model.num_layers is {}",
         *stacked_layers, layout.num_layers);
  }
  if (per_layer_count > layout.num_layers) {
    Fail("an adapter names layer {} but run_config.yaml model.num_layers is {}",
         per_layer_count - 1, layout.num_layers);
  }
  const int64_t stage_chunks = int64_t{layout.pipeline_parallel} * layout.virtual_pipeline;
  if (layout.num_layers % stage_chunks != 0) {
    Fail("{} layers do not split evenly over pipeline_model_parallel_size {} x virtual {}",
         layout.num_layers, layout.pipeline_parallel, layout.virtual_pipeline);
  }

  layout.layers.resize(static_cast<std::size_t>(layout.num_layers + layout.mtp_layers));
  for (int64_t l = 0; l < std::ssize(layout.layers); ++l) {
    auto& layer = layout.layers[static_cast<std::size_t>(l)];
    layer.layer = l;
    // Megatron builds the MTP block with the output layer, on the last stage.
    layer.pp_stage =
        l >= layout.num_layers
            ? layout.pipeline_parallel - 1
            : StageOfLayer(l, layout.num_layers, layout.pipeline_parallel, layout.virtual_pipeline);
  }
  for (Found& entry : found) {
    if (entry.key.mtp_layer) entry.key.layer = layout.num_layers + *entry.key.mtp_layer;
  }

  std::sort(found.begin(), found.end(),
            [](const Found& a, const Found& b) { return a.meta->fqn < b.meta->fqn; });
  // Split tensors: every part there once, of one dtype, differing in rows only.
  std::map<std::string, SplitTensor> splits;
  {
    std::map<std::string, std::array<const Found*, kSplitParts.size()>> parts;
    for (const Found& entry : found) {
      if (!entry.key.split.empty())
        parts[WithoutSplit(entry.meta->fqn, entry.key)][SplitIndex(entry.key.split)] = &entry;
    }
    for (const auto& [whole, of] : parts) {
      SplitTensor split;
      int64_t rows = 0;
      for (std::size_t i = 0; i < of.size(); ++i) {
        if (of[i] == nullptr) {
          Fail("'{}' is saved split in parts z, x, B, C, dt, but the checkpoint has no '{}.{}'",
               whole, whole, kSplitParts[i]);
        }
        const TensorMeta& part = *of[i]->meta;
        const std::size_t row_axis = of[i]->key.layer ? 0 : 1;  // past a stacked layer axis
        if (part.size.size() != row_axis + 2) {
          Fail("'{}' should be 2-D per layer, found {}", part.fqn, ShapeToString(part.size));
        }
        std::vector<int64_t> shape(part.size.begin() + static_cast<std::ptrdiff_t>(row_axis),
                                   part.size.end());
        const TensorMeta& first = *of[0]->meta;
        if (part.dtype != first.dtype || shape[1] != first.size.back() ||
            (row_axis == 1 && part.size.front() != first.size.front())) {
          Fail("'{}' is {} {} but '{}' is {} {}: the parts of one tensor differ only in rows",
               part.fqn, TorchName(part.dtype), ShapeToString(part.size), first.fqn,
               TorchName(first.dtype), ShapeToString(first.size));
        }
        split.rows[i] = rows;
        rows += shape[0];
        split.shape = {rows, shape[1]};
      }
      splits.emplace(whole, std::move(split));
    }
    for (const Found& entry : found) {
      if (entry.key.split.empty() && parts.contains(entry.meta->fqn))
        Fail("'{}' is saved both whole and split in parts", entry.meta->fqn);
    }
  }
  for (const Found& entry : found) {
    // Named copies, not structured bindings: lambdas below capture them (clang < 16 cannot).
    const TensorMeta* meta = entry.meta;
    const auto& key = entry.key;
    ValidateChunkLayout(*meta);
    const bool stacked = !key.layer.has_value();
    const std::vector<int64_t> shape(meta->size.begin() + (stacked ? 1 : 0), meta->size.end());
    // A split tensor's part fills its rows of the whole, which the layer holds as one tensor.
    const std::string whole_fqn = WithoutSplit(meta->fqn, key);
    const SplitTensor* split = key.split.empty() ? nullptr : &splits.at(whole_fqn);
    const std::vector<int64_t>& whole_shape = split ? split->shape : shape;
    const int64_t first_row = split ? split->rows[SplitIndex(key.split)] : 0;
    const uint64_t nbytes = CheckedMul(CheckedNumel(whole_shape, "adapter shape"),
                                       ItemSize(meta->dtype), "adapter bytes");
    for (std::size_t chunk_index = 0; chunk_index < meta->chunks.size(); ++chunk_index) {
      const ChunkMeta& chunk = meta->chunks[chunk_index];
      const int64_t l = stacked ? chunk.offsets[0] : *key.layer;
      if (stacked && chunk.sizes[0] != 1) {
        Fail("'{}': chunk at {} spans {} layers; expected one chunk per layer", meta->fqn,
             ShapeToString(chunk.offsets), chunk.sizes[0]);
      }
      if (l >= std::ssize(layout.layers)) Fail("'{}': layer {} is beyond num_layers", meta->fqn, l);
      auto& layer = layout.layers[static_cast<std::size_t>(l)];
      auto it = std::find_if(layer.tensors.begin(), layer.tensors.end(),
                             [&](const LayerTensor& t) { return t.fqn == whole_fqn; });
      if (it == layer.tensors.end()) {
        const std::size_t expert_axis_rank = key.param == AdapterParam::kMagnitude ? 2 : 3;
        const int64_t experts =
            IsExpertModule(key.module) && shape.size() == expert_axis_rank ? shape[0] : 0;
        AdapterKey whole_key = key;
        whole_key.split.clear();
        layer.tensors.push_back(
            {entry.index, whole_fqn, meta->dtype, whole_key, experts, whole_shape, nbytes, 0});
        it = layer.tensors.end() - 1;
      }
      LayerChunk c;
      c.tensor_index = static_cast<std::size_t>(it - layer.tensors.begin());
      c.meta_index = entry.index;
      c.chunk_index = chunk_index;
      c.offsets_in_layer.assign(chunk.offsets.begin() + (stacked ? 1 : 0), chunk.offsets.end());
      c.sizes_in_layer.assign(chunk.sizes.begin() + (stacked ? 1 : 0), chunk.sizes.end());
      c.nbytes = CheckedNumel(c.sizes_in_layer, "chunk") * ItemSize(meta->dtype);
      // The training shard from the part's own sharding, before its rows move into the whole.
      LayerTensor part = *it;
      part.fqn = meta->fqn;
      part.shape = shape;
      c.slot = SlotOf(part, c.offsets_in_layer, c.sizes_in_layer, layout);
      c.offsets_in_layer[0] += first_row;
      layer.chunks.push_back(std::move(c));
    }
  }
  for (auto& layer : layout.layers) {
    uint64_t offset = 0;
    for (auto& t : layer.tensors) {
      t.offset_in_layer = offset;
      offset += t.nbytes;
    }
    layer.nbytes = offset;
    std::sort(layer.chunks.begin(), layer.chunks.end(),
              [](const LayerChunk& a, const LayerChunk& b) {
                return std::tie(a.slot, a.tensor_index, a.offsets_in_layer) <
                       std::tie(b.slot, b.tensor_index, b.offsets_in_layer);
              });
  }
  // Layers that carry adapters carry the same ones (per-layer keys may target a subset of
  // layers), but a dense layer and an MoE layer differ (DeepSeek-V3's first_k_dense_replace,
  // Qwen3-MoE's mlp_only_layers), and so do a hybrid model's Mamba, attention and MLP layers
  // (Nemotron-H): each is held to the first layer of its own kind, named by the blocks its
  // modules are in ("self_attention", "mlp", "mixer") and whether it has experts.
  std::map<std::string, const LayerLayout*> reference;
  for (const auto& layer : layout.layers) {
    if (layer.tensors.empty()) continue;
    std::set<std::string> blocks;
    for (const LayerTensor& t : layer.tensors) {
      blocks.insert(IsExpertModule(t.key.module) ? "MoE"
                                                 : t.key.module.substr(0, t.key.module.find('.')));
    }
    std::string kind;
    for (const std::string& block : blocks) kind += (kind.empty() ? "" : "+") + block;
    const LayerLayout*& first = reference[kind];
    if (first == nullptr) first = &layer;
    if (layer.tensors.size() != first->tensors.size()) {
      Fail("layer {} ({}) has {} adapter tensors but layer {} ({}) has {}", layer.layer, kind,
           layer.tensors.size(), first->layer, kind, first->tensors.size());
    }
  }
  return layout;
}

}  // namespace adapter_job::checkpoint
