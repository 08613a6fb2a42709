#include "adapter_job/merge/merged_layout.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"

namespace adapter_job::merge {
namespace {

// save_pretrained writes in module order, which keeps each layer's tensors together and the
// layers in order. Without the module tree, numbers compare as numbers: embed_tokens, layers 0,
// 1, 2, ... 10, then the final norm.
bool NaturalLess(const std::string& a, const std::string& b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) &&
        std::isdigit(static_cast<unsigned char>(b[j]))) {
      std::size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string_view na(a.data() + i, ie - i), nb(b.data() + j, je - j);
      if (na.size() != nb.size()) return na.size() < nb.size();  // no leading zeros in names
      if (na != nb) return na < nb;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::string ShardFileName(std::size_t index, std::size_t count) {
  if (count == 1) return "model.safetensors";
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", index + 1, count);
}

// huggingface_hub's split_state_dict_into_shards_factory: a tensor larger than the limit gets a
// shard of its own (placed before the shard being filled), otherwise a shard is closed when the
// next tensor would take it past the limit.
std::vector<std::vector<std::size_t>> SplitIntoShards(const std::vector<OutputTensor>& tensors,
                                                      uint64_t max_bytes) {
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  uint64_t current_bytes = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const uint64_t bytes = tensors[i].nbytes;
    if (bytes > max_bytes) {
      shards.push_back({i});
      continue;
    }
    if (current_bytes + bytes > max_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += bytes;
  }
  if (!current.empty()) shards.push_back(std::move(current));
  return shards;
}

}  // namespace

uint64_t ParseShardSize(const std::string& text) {
  std::string upper = text;
  std::transform(upper.begin(), upper.end(), upper.begin(),
                 [](unsigned char c) { return std::toupper(c); });
  struct Unit {
    const char* suffix;
    uint64_t factor;
  };
  static constexpr Unit kUnits[] = {{"GIB", 1ull << 30},   {"MIB", 1ull << 20}, {"KIB", 1ull << 10},
                                    {"GB", 1'000'000'000}, {"MB", 1'000'000},   {"KB", 1'000}};
  uint64_t factor = 1;
  std::string digits = text;
  bool bits = false;
  for (const Unit& unit : kUnits) {
    const std::string_view suffix = unit.suffix;
    if (upper.ends_with(suffix)) {
      factor = unit.factor;
      digits = text.substr(0, text.size() - suffix.size());
      bits = suffix.size() == 2 && text.back() == 'b';
      break;
    }
  }
  const bool numeric = !digits.empty() && std::all_of(digits.begin(), digits.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c));
  });
  uint64_t value = 0;
  if (numeric && digits.size() <= 15) value = std::stoull(digits) * factor / (bits ? 8 : 1);
  if (value == 0)
    Fail("--max-shard-size '{}' is not a size such as 5GB, 500MB, 2GiB or a number of bytes", text);
  return value;
}

MergedLayout PlanMergedLayout(const safetensors::ModelWeights& base,
                              const std::vector<std::string>& modules, std::optional<DType> dtype,
                              uint64_t max_shard_bytes, int world_size) {
  std::map<std::string, std::string> adapted;  // weight name -> module
  for (const std::string& module : modules) {
    // GPT-OSS's experts: the adapter is PEFT's ParamWrapper on the fused parameter itself, which
    // merges as it is stored; the hub's MXFP4 form would have to become another tensor.
    if (const auto* fused = base.Find(module); fused && fused->entry.shape.size() == 3) {
      adapted.emplace(module, module);
      continue;
    }
    if (base.Find(module + "_blocks")) {
      Fail(
          "the adapter targets the fused expert parameter '{}', which the base stores as MXFP4 "
          "(_blocks/_scales): merge it into a bfloat16 copy of the model (transformers dequantizes "
          "it: Mxfp4Config(dequantize=True)) or export the adapter",
          module);
    }
    const std::string weight = module + ".weight";
    if (!base.Find(weight))
      Fail("the adapter targets '{}', but the base model has no tensor '{}'", module, weight);
    adapted.emplace(weight, module);
  }
  MergedLayout layout;
  for (const auto& [name, tensor] : base.tensors()) {
    OutputTensor out;
    out.name = name;
    out.base = &tensor;
    out.shape = tensor.entry.shape;
    out.dtype = tensor.entry.dtype;
    if (const auto it = adapted.find(name); it != adapted.end()) out.module = it->second;
    // --dtype converts the floating-point tensors; integer ones (none in today's models) stay.
    if (dtype && IsFloatingPoint(out.dtype)) out.dtype = *dtype;
    const uint64_t elements = CheckedNumel(out.shape, "a base tensor");
    out.nbytes = CheckedMul(elements, ItemSize(out.dtype), "a base tensor's bytes");
    layout.total_parameters += elements;
    layout.total_bytes += out.nbytes;
    layout.tensors.push_back(std::move(out));
  }
  std::sort(
      layout.tensors.begin(), layout.tensors.end(),
      [](const OutputTensor& a, const OutputTensor& b) { return NaturalLess(a.name, b.name); });

  // Ranks take contiguous runs of the save order, split by bytes: rank r writes the tensors
  // whose middle byte falls in the r-th 1/world_size of the total.
  uint64_t before = 0;
  for (OutputTensor& t : layout.tensors) {
    const long double middle = before + t.nbytes / 2.0L;
    const long double share = layout.total_bytes ? middle / layout.total_bytes : 0;
    t.rank = std::min(world_size - 1, static_cast<int>(share * world_size));
    before += t.nbytes;
  }

  const auto shards = SplitIntoShards(layout.tensors, max_shard_bytes);
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::vector<safetensors::TensorSpec> specs;
    for (const std::size_t i : shards[s]) {
      const OutputTensor& t = layout.tensors[i];
      specs.push_back({t.name, t.dtype, t.shape});
    }
    OutputShard shard;
    shard.file = ShardFileName(s, shards.size());
    shard.header =
        safetensors::SerializeHeader(specs, std::map<std::string, std::string>{{"format", "pt"}});
    // SerializeHeader put the specs in file order: the tensors follow the header back to back.
    std::map<std::string, std::size_t> by_name;
    for (const std::size_t i : shards[s]) by_name.emplace(layout.tensors[i].name, i);
    uint64_t offset = shard.header.size();
    for (const auto& spec : specs) {
      OutputTensor& t = layout.tensors[by_name.at(spec.name)];
      t.shard = s;
      t.offset = offset;
      offset += t.nbytes;
    }
    shard.size = offset;
    layout.shards.push_back(std::move(shard));
  }
  return layout;
}

nlohmann::ordered_json IndexJson(const MergedLayout& layout) {
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_parameters", layout.total_parameters},
                       {"total_size", layout.total_bytes}};
  std::vector<const OutputTensor*> sorted;
  for (const auto& t : layout.tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(),
            [](const OutputTensor* a, const OutputTensor* b) { return a->name < b->name; });
  nlohmann::ordered_json map = nlohmann::ordered_json::object();
  for (const OutputTensor* t : sorted) map[t->name] = layout.shards[t->shard].file;
  index["weight_map"] = std::move(map);
  return index;
}

}  // namespace adapter_job::merge
