// The splits are Megatron-Bridge's (models/conversion/param_mapping.py split_qkv_weights,
// peft_bridge.py _split_fused_fc1_linear_out_weight); see shared notes megatron-bridge-export.md
// §2.3 and §2.6. Splitting rows of lora_B (and of the DoRA magnitude, one norm per output row) is
// exact: the row-split of s·B·A equals per-projection LoRAs that share A.
#include "adapter_job/convert/layer_conversion.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <thread>

#include "adapter_job/core/dtype_cast.h"
#include "adapter_job/core/error.h"

namespace adapter_job::convert {
namespace {

using checkpoint::AdapterParam;
using checkpoint::LayerLayout;
using checkpoint::LayerTensor;
using Rows = std::vector<std::pair<int64_t, int64_t>>;

// A config sum's key.
int64_t ConfigInteger(const HfModelConfig& m, const std::string& key, const Width& width) {
  const nlohmann::json& raw = m.text();
  if (!raw.contains(key) || !raw[key].is_number_integer() || raw[key].get<int64_t>() <= 0) {
    Fail("{}: the model family's width '{}' needs '{}' as a positive integer, found {}",
         m.path.string(), width.text, key, raw.contains(key) ? raw[key].dump() : "no such key");
  }
  return raw[key].get<int64_t>();
}

int64_t WidthOf(const Width& width, const HfModelConfig& m) {
  switch (width.kind) {
    case Width::Kind::kHidden:
      return m.hidden_size;
    case Width::Kind::kQuery:
      return m.num_attention_heads * m.head_dim;
    case Width::Kind::kKeyValue:
      return m.num_key_value_heads * m.head_dim;
    case Width::Kind::kFfn:
      return m.intermediate_size;
    case Width::Kind::kExpertFfn:
      return m.expert_intermediate_size;
    case Width::Kind::kExperts:
      return m.num_experts;
    case Width::Kind::kConfigSum:
      break;
  }
  int64_t sum = 0;
  for (const auto& term : width.terms) {
    int64_t product = 1;
    for (const std::string& factor : term) {
      product *= factor[0] >= '0' && factor[0] <= '9' ? std::stoll(factor)
                                                      : ConfigInteger(m, factor, width);
    }
    sum += product;
  }
  return sum;
}

// Rows of a tensor as OutputTensor::rows counts them: all dimensions but the last.
int64_t LeadingRows(const std::vector<int64_t>& shape) {
  if (shape.size() < 2) return shape.empty() ? 1 : shape[0];
  int64_t rows = 1;
  for (std::size_t d = 0; d + 1 < shape.size(); ++d) rows *= shape[d];
  return rows;
}

// A module path as a PEFT pattern: dots escaped, "{expert}" standing for any expert.
std::string PathPattern(const std::string& path) {
  std::string out;
  for (std::size_t i = 0; i < path.size(); ++i) {
    if (path.compare(i, 8, "{expert}") == 0) {
      out += "\\d+";
      i += 7;
    } else {
      if (path[i] == '.') out += '\\';
      out += path[i];
    }
  }
  return out;
}

std::string_view Suffix(AdapterParam param) {
  switch (param) {
    case AdapterParam::kLinearIn:
      return ".lora_A.weight";
    case AdapterParam::kLinearOut:
      return ".lora_B.weight";
    case AdapterParam::kMagnitude:
      return ".lora_magnitude_vector";
  }
  return "";
}

// Rows of each part of a fused output: QKV per query group, gate/up halves of `ffn` rows each (or,
// for the DoRA fc1 magnitude that Megatron stores TP-interleaved [g0; u0; g1; u1; ...], per TP
// block).
std::vector<Rows> SplitRows(Fusion fusion, AdapterParam param, const ConversionSettings& s,
                            int64_t ffn) {
  const auto& m = s.model;
  if (fusion == Fusion::kQkv) {
    const int64_t d = m.head_dim;
    const int64_t groups = m.num_key_value_heads;
    const int64_t heads_per_group = m.num_attention_heads / groups;
    std::vector<Rows> parts(3);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t base = g * (heads_per_group + 2) * d;
      parts[0].push_back({base, base + heads_per_group * d});
      parts[1].push_back({base + heads_per_group * d, base + (heads_per_group + 1) * d});
      parts[2].push_back({base + (heads_per_group + 1) * d, base + (heads_per_group + 2) * d});
    }
    return parts;
  }
  if (fusion == Fusion::kGatedMlp) {
    const int64_t f = ffn;
    if (param != AdapterParam::kMagnitude) return {{{0, f}}, {{f, 2 * f}}};
    const int64_t tp = s.training_tensor_parallel;
    if (f % tp != 0) Fail("ffn size {} is not divisible by the training TP {}", f, tp);
    const int64_t slice = f / tp;
    std::vector<Rows> parts(2);
    for (int64_t i = 0; i < tp; ++i) {
      parts[0].push_back({2 * i * slice, (2 * i + 1) * slice});
      parts[1].push_back({(2 * i + 1) * slice, (2 * i + 2) * slice});
    }
    return parts;
  }
  return {{}};
}

// Stored rows are [first halves of every TP rank's rows; second halves]; true order is rank by
// rank.
Rows UndoSwigluSharding(int64_t rows, int64_t tp) {
  if (rows % (2 * tp) != 0) Fail("{} rows cannot be split into 2 x {} SwiGLU chunks", rows, tp);
  const int64_t quarter = rows / (2 * tp);
  Rows out;
  for (int64_t i = 0; i < tp; ++i) {
    out.push_back({i * quarter, (i + 1) * quarter});
    out.push_back({(tp + i) * quarter, (tp + i + 1) * quarter});
  }
  return out;
}

// `expected` is one expert's shape for expert tensors: their leading expert axis is checked too.
void ExpectShape(const LayerTensor& t, std::vector<int64_t> expected, const HfModelConfig& m,
                 std::string_view why) {
  if (t.experts > 0) expected.insert(expected.begin(), m.num_experts);
  if (t.shape != expected) {
    Fail("'{}' has per-layer shape {} but {} in {} implies {} ({}{})", t.fqn,
         ShapeToString(t.shape), "the model config", m.path.string(), ShapeToString(expected), why,
         t.experts > 0 ? ", per expert" : "");
  }
}

// PEFT wraps each targeted parameter of one module in a ParamWrapper around what was there, in
// the order the module registers them (tuners_utils.py _inject_parameters walks
// named_parameters), so the last one is outermost: a parameter's adapter lies under one
// ".base_layer" for each targeted parameter of its module registered after it.
int NestingDepth(const ModuleMapping& experts, const ModelFamily& family,
                 const LayerLayout& layer) {
  const auto parent = [](const ModuleMapping& m) {
    return m.fused_parameter.substr(0, m.fused_parameter.rfind('.'));
  };
  int depth = 0;
  bool after = false;
  for (const ModuleMapping* m : family.StoredFusedExperts()) {
    if (m == &experts) {
      after = true;
    } else if (after && parent(*m) == parent(experts) &&
               std::any_of(layer.tensors.begin(), layer.tensors.end(),
                           [&](const LayerTensor& t) { return t.key.module == m->megatron; })) {
      ++depth;
    }
  }
  return depth;
}

// One adapter tensor of a stored-fused expert parameter in PEFT's ParamWrapper layout: lora_A
// [experts x rank, in] (expert-major: the rows as they are), lora_B [out, rank x experts] (see
// OutputTensor::packing).
OutputTensor FusedParameterOutput(const LayerTensor& t, std::size_t index,
                                  const ModuleMapping& experts,
                                  const std::vector<HfModule>& targets, AdapterParam param,
                                  const std::vector<int64_t>& unit, const std::string& layer_prefix,
                                  int depth, const ConversionSettings& s) {
  const int64_t n = s.model.num_experts;
  const std::string& parameter = experts.fused_parameter;
  const std::string parent = parameter.substr(0, parameter.rfind('.'));
  std::string wrapper = layer_prefix + parent;
  for (int i = 0; i < depth; ++i) wrapper += ".base_layer";
  OutputTensor out;
  out.module = layer_prefix + parameter;
  out.leaf = parameter.substr(parameter.rfind('.') + 1);
  out.path = parameter;
  out.parameter = parameter;
  out.expert = true;
  out.param = param;
  out.name = wrapper + std::string(Suffix(param));
  out.source = index;
  out.dtype = s.dtype.value_or(t.dtype);
  const int64_t rank = param == AdapterParam::kLinearIn ? unit[0] : unit[1];
  if (param == AdapterParam::kLinearIn) {
    out.shape = {n * rank, unit[1]};
    if (t.experts == 0) out.rows.assign(static_cast<std::size_t>(n), {0, rank});
  } else {
    out.shape = {unit[0], rank * n};
    out.packing = OutputTensor::ExpertPacking{n, t.experts > 0 ? n : 1,
                                              experts.fused_layout == FusedLayout::kInOutInterleaved
                                                  ? static_cast<int64_t>(targets.size())
                                                  : 1};
  }
  out.rank_keys.emplace_back(PathPattern(parameter), rank);
  return out;
}

// lora_B rows [source experts, out, rank] -> [out, rank, experts] (OutputTensor::packing), with
// elements of type T (the size of the dtype's item: the permutation moves them as they are).
template <typename T>
void PackAs(const std::byte* rows, std::byte* packed, const OutputTensor::ExpertPacking& packing,
            int64_t out_rows, int64_t rank, int64_t begin, int64_t end) {
  const int64_t part = out_rows / packing.interleave;
  const int64_t expert_stride = packing.source_experts == 1 ? 0 : out_rows * rank;
  T* to = reinterpret_cast<T*>(packed) + begin * rank * packing.experts;
  for (int64_t o = begin; o < end; ++o) {
    const int64_t row = (o % packing.interleave) * part + o / packing.interleave;
    const T* from = reinterpret_cast<const T*>(rows) + row * rank;
    // Each expert's row (rank elements, one cache line or two) is read for all of its rank.
    for (int64_t k = 0; k < rank; ++k) {
      for (int64_t e = 0; e < packing.experts; ++e) *to++ = from[e * expert_stride + k];
    }
  }
}

std::vector<std::byte> PackExpertsInnermost(std::span<const std::byte> rows,
                                            const OutputTensor::ExpertPacking& packing,
                                            const std::vector<int64_t>& shape, std::size_t item) {
  const int64_t out_rows = shape[0], rank = shape[1] / packing.experts;
  std::vector<std::byte> packed(rows.size() / static_cast<std::size_t>(packing.source_experts) *
                                static_cast<std::size_t>(packing.experts));
  const auto pack = [&](int64_t begin, int64_t end) {
    switch (item) {
      case 2:
        return PackAs<uint16_t>(rows.data(), packed.data(), packing, out_rows, rank, begin, end);
      case 4:
        return PackAs<uint32_t>(rows.data(), packed.data(), packing, out_rows, rank, begin, end);
      case 8:
        return PackAs<uint64_t>(rows.data(), packed.data(), packing, out_rows, rank, begin, end);
    }
  };
  if (item != 2 && item != 4 && item != 8)
    Fail("cannot pack expert adapters of {}-byte elements", item);
  // Gathering every expert's row for each output row is bound by memory latency, not bandwidth:
  // a large tensor (GPT-OSS-120B's: 24 MB a layer) is split over threads.
  constexpr std::size_t kBytesPerThread = 4 << 20;
  const auto threads = static_cast<int64_t>(std::clamp<std::size_t>(
      packed.size() / kBytesPerThread, 1, std::max(1u, std::thread::hardware_concurrency())));
  std::vector<std::jthread> workers;
  const int64_t per = (out_rows + threads - 1) / threads;
  for (int64_t begin = 0; begin < out_rows; begin += per)
    workers.emplace_back(pack, begin, std::min(out_rows, begin + per));
  return packed;
}

// OutputTensor::padding: lora_A [rank, in] gets zero rows, lora_B [out, rank] is scaled and gets
// zero columns, in float32, then cast to the output's dtype.
Tensor PadRank(const std::vector<std::span<const std::byte>>& pieces, const OutputTensor& output,
               DType source_dtype) {
  const OutputTensor::RankPadding& pad = *output.padding;
  Tensor source;
  source.dtype = source_dtype;
  for (const auto& piece : pieces)
    source.data.insert(source.data.end(), piece.begin(), piece.end());
  const bool lora_a = output.param == AdapterParam::kLinearIn;
  const int64_t rows = lora_a ? pad.rank : output.shape.at(0);
  const int64_t cols = lora_a ? output.shape.at(1) : pad.rank;
  source.shape = {rows, cols};
  const Tensor values = CastTensor(source, DType::kFloat32);
  const float* from = reinterpret_cast<const float*>(values.data.data());
  Tensor padded = Tensor::Zeros(DType::kFloat32, output.shape);
  float* to = reinterpret_cast<float*>(padded.data.data());
  const int64_t stride = output.shape.at(1);
  const auto scale = static_cast<float>(pad.scale);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col = 0; col < cols; ++col)
      to[row * stride + col] = from[row * cols + col] * scale;
  }
  return CastTensor(padded, output.dtype);
}

}  // namespace

std::vector<OutputTensor> PlanLayerConversion(const LayerLayout& layer,
                                              const ConversionSettings& s) {
  const ModelFamily& family = s.family;
  const std::string layer_prefix = fmt::format("{}.{}.", family.hf_layers_prefix, layer.layer);
  std::vector<OutputTensor> outputs;
  // HF module -> which params it received, to catch incomplete adapters.
  std::map<std::string, std::map<AdapterParam, int64_t>> received;

  for (std::size_t index = 0; index < layer.tensors.size(); ++index) {
    const LayerTensor& t = layer.tensors[index];
    const auto& key = t.key;
    if (key.param == AdapterParam::kMagnitude && s.kind != checkpoint::AdapterKind::kDoRA) {
      Fail("'{}' is a DoRA magnitude but run_config.yaml peft._target_ is not DoRA", t.fqn);
    }
    std::vector<HfModule> targets;
    Fusion fusion = Fusion::kNone;
    bool swiglu_sharded = false;
    const ModuleMapping* experts = nullptr;
    std::string peft_refuses;
    if (!key.canonical.empty()) {
      const CanonicalMapping* c = family.FindCanonical(key.module, key.canonical);
      if (c == nullptr) {
        Fail(
            "'{}': {} has no adapter '{}' in the {} family (known: adapter_q/k/v on "
            "self_attention.linear_qkv, adapter_gate/up on mlp.linear_fc1)",
            t.fqn, key.module, key.canonical, family.name);
      }
      targets = {c->hf};
      swiglu_sharded = c->swiglu_sharded;
    } else {
      const ModuleMapping* mapping = family.FindModule(key.module);
      if (mapping == nullptr) {
        std::string known;
        for (const auto& m : family.modules) known += (known.empty() ? "" : ", ") + m.megatron;
        Fail("'{}': module '{}' has no HuggingFace mapping in the {} family (known: {})", t.fqn,
             key.module, family.name, known);
      }
      targets = mapping->hf;
      fusion = mapping->fusion;
      peft_refuses = mapping->peft_refuses;
      if (mapping->experts) experts = mapping;
    }
    if (experts != nullptr) {
      if (s.model.num_experts == 0) {
        Fail(
            "'{}' holds MoE expert adapters but {} describes a dense model (no num_experts or "
            "num_local_experts)",
            t.fqn, s.model.path.string());
      }
      if (key.param == AdapterParam::kMagnitude) {
        Fail("'{}': DoRA on MoE experts is not supported (nor by Megatron-Bridge)", t.fqn);
      }
    }
    // One expert's tensor (a dense module's whole tensor) without the expert axis.
    const std::vector<int64_t> unit(t.shape.begin() + (t.experts > 0 ? 1 : 0), t.shape.end());

    // Shapes must agree with the HF config: [r, in] for A, [out, r] for B, [out] for m.
    int64_t out_rows = 0;
    for (const auto& target : targets) out_rows += WidthOf(target.out, s.model);
    const int64_t in_width = WidthOf(targets.front().in, s.model);
    switch (key.param) {
      case AdapterParam::kLinearIn:
        if (unit.size() != 2)
          Fail("'{}' should be 2-D per layer, found {}", t.fqn, ShapeToString(t.shape));
        ExpectShape(t, {unit[0], in_width}, s.model, "lora_A is [rank, in_features]");
        break;
      case AdapterParam::kLinearOut:
        if (unit.size() != 2)
          Fail("'{}' should be 2-D per layer, found {}", t.fqn, ShapeToString(t.shape));
        ExpectShape(t, {out_rows, unit[1]}, s.model, "lora_B is [out_features, rank]");
        break;
      case AdapterParam::kMagnitude:
        ExpectShape(t, {out_rows}, s.model, "the DoRA magnitude is [out_features]");
        break;
    }

    std::vector<Rows> parts =
        key.param == AdapterParam::kLinearIn
            ? std::vector<Rows>(targets.size())
            : SplitRows(fusion, key.param, s, WidthOf(targets.front().out, s.model));
    if (swiglu_sharded && key.param == AdapterParam::kLinearOut) {
      parts = {UndoSwigluSharding(out_rows, s.training_tensor_parallel)};
    }
    const int64_t rank_dim = key.param == AdapterParam::kLinearIn    ? unit[0]
                             : key.param == AdapterParam::kLinearOut ? unit[1]
                                                                     : -1;
    if (experts != nullptr && experts->stored_fused) {
      OutputTensor out =
          FusedParameterOutput(t, index, *experts, targets, key.param, unit, layer_prefix,
                               NestingDepth(*experts, family, layer), s);
      if (!received[out.module].emplace(key.param, rank_dim).second)
        Fail("two adapter tensors map to '{}'{} (from '{}')", out.module, Suffix(key.param), t.fqn);
      outputs.push_back(std::move(out));
      continue;
    }
    // Each expert takes its own slice of a tensor with an expert axis; a shared adapter saved
    // without one (Megatron-Bridge before 0.5.1) is every expert's.
    const int64_t copies = experts != nullptr ? s.model.num_experts : 1;
    for (int64_t expert = 0; expert < copies; ++expert) {
      const int64_t first_row = t.experts > 0 ? expert * unit[0] : 0;
      for (std::size_t p = 0; p < targets.size(); ++p) {
        OutputTensor out;
        const std::string path = ExpertPath(targets[p].path, expert);
        out.module = layer_prefix + path;
        out.leaf = path.substr(path.rfind('.') + 1);
        out.path = path;
        out.expert = experts != nullptr;
        out.param = key.param;
        out.name = out.module + std::string(Suffix(key.param));
        out.source = index;
        out.peft_refuses = peft_refuses;
        out.rows = parts[p];
        if (t.experts > 0) {
          if (out.rows.empty()) out.rows = {{0, unit[0]}};
          for (auto& [begin, end] : out.rows) {
            begin += first_row;
            end += first_row;
          }
        }
        out.shape = unit;
        if (!out.rows.empty()) {
          out.shape[0] = 0;
          for (const auto& [begin, end] : out.rows) out.shape[0] += end - begin;
        }
        out.dtype = s.dtype.value_or(t.dtype);
        if (experts != nullptr) {
          out.rank_keys.emplace_back(PathPattern(targets[p].path), rank_dim);
          if (!experts->fused_parameter.empty()) {
            out.rank_keys.emplace_back(PathPattern(experts->fused_parameter),
                                       rank_dim * static_cast<int64_t>(targets.size()));
          }
        }
        if (!received[out.module].emplace(key.param, rank_dim).second) {
          Fail("two adapter tensors map to '{}'{} (from '{}')", out.module, Suffix(key.param),
               t.fqn);
        }
        outputs.push_back(std::move(out));
      }
    }
  }

  for (const auto& [module, params] : received) {
    const bool has_a = params.contains(AdapterParam::kLinearIn);
    const bool has_b = params.contains(AdapterParam::kLinearOut);
    if (!has_a || !has_b) {
      Fail("layer {}: '{}' has lora_{} but no lora_{}", layer.layer, module, has_a ? "A" : "B",
           has_a ? "B" : "A");
    }
    if (params.at(AdapterParam::kLinearIn) != params.at(AdapterParam::kLinearOut)) {
      Fail("layer {}: '{}' has lora_A of rank {} but lora_B of rank {}", layer.layer, module,
           params.at(AdapterParam::kLinearIn), params.at(AdapterParam::kLinearOut));
    }
    if (s.kind == checkpoint::AdapterKind::kDoRA && !params.contains(AdapterParam::kMagnitude)) {
      Fail("layer {}: DoRA adapter '{}' has no weight_magnitude in the checkpoint", layer.layer,
           module);
    }
  }
  return outputs;
}

std::vector<std::span<const std::byte>> OutputPieces(const OutputTensor& output,
                                                     const LayerLayout& layer,
                                                     std::span<const std::byte> layer_buffer) {
  const LayerTensor& source = layer.tensors[output.source];
  const auto bytes = layer_buffer.subspan(source.offset_in_layer, source.nbytes);
  if (output.rows.empty()) return {bytes};
  const std::size_t row_bytes = source.nbytes / static_cast<std::size_t>(LeadingRows(source.shape));
  std::vector<std::span<const std::byte>> pieces;
  for (const auto& [begin, end] : output.rows) {
    pieces.push_back(bytes.subspan(static_cast<std::size_t>(begin) * row_bytes,
                                   static_cast<std::size_t>(end - begin) * row_bytes));
  }
  return pieces;
}

bool NeedsCopy(const OutputTensor& output, const LayerLayout& layer) {
  return layer.tensors[output.source].dtype != output.dtype || output.packing.has_value() ||
         output.padding.has_value();
}

Tensor MaterializeOutput(const OutputTensor& output, const LayerLayout& layer,
                         std::span<const std::byte> layer_buffer) {
  Tensor out;
  out.dtype = layer.tensors[output.source].dtype;
  out.shape = output.shape;
  const auto pieces = OutputPieces(output, layer, layer_buffer);
  if (output.padding) return PadRank(pieces, output, out.dtype);
  if (output.packing && pieces.size() == 1) {  // packed straight from the layer buffer
    out.data = PackExpertsInnermost(pieces[0], *output.packing, output.shape, ItemSize(out.dtype));
  } else {
    for (const auto& piece : pieces) out.data.insert(out.data.end(), piece.begin(), piece.end());
    if (output.packing)
      out.data = PackExpertsInnermost(out.data, *output.packing, output.shape, ItemSize(out.dtype));
  }
  return out.dtype != output.dtype ? CastTensor(out, output.dtype) : out;
}

}  // namespace adapter_job::convert
