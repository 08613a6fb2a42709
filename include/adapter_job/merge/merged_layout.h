// What a merged export writes, decided on every rank from the base's headers and the adapter
// before any byte is read: each output tensor (the base's names, shapes and, unless --dtype says
// otherwise, dtypes), the shard files as transformers' save_pretrained splits them, each
// tensor's place in its file, and which rank writes it. Ranks split by bytes in save order, so
// each writes a run of whole layers, and every rank's part of a shard lands in the same file.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "adapter_job/core/dtype.h"
#include "adapter_job/safetensors/model_weights.h"

namespace adapter_job::merge {

// transformers 5's default --max-shard-size ("50GB").
inline constexpr uint64_t kDefaultMaxShardBytes = 50'000'000'000;

// "5GB" (10^9), "5GiB" (2^30), "500MB", "100KB", "5Gb" (bits, as HF reads it) or plain bytes, as
// transformers' convert_file_size_to_int; FormatError naming --max-shard-size otherwise.
uint64_t ParseShardSize(const std::string& text);

struct OutputTensor {
  std::string name;
  DType dtype = DType::kFloat32;  // as written
  std::vector<int64_t> shape;
  uint64_t nbytes = 0;
  const safetensors::ModelWeights::Tensor* base = nullptr;
  std::optional<std::string> module;  // the adapted module it is merged with
  std::size_t shard = 0;
  uint64_t offset = 0;  // of its first byte in the shard file
  int rank = 0;         // the rank that merges and writes it
};

struct OutputShard {
  std::string file;    // model-00001-of-00004.safetensors, or model.safetensors alone
  std::string header;  // the file's first bytes (length prefix included)
  uint64_t size = 0;   // of the whole file
};

struct MergedLayout {
  std::vector<OutputTensor> tensors;  // in save order
  std::vector<OutputShard> shards;
  uint64_t total_bytes = 0;  // of the tensors
  uint64_t total_parameters = 0;
};

// `modules`: the adapted modules (e.g. model.layers.0.self_attn.q_proj), each merged into its
// `<module>.weight`; FormatError naming the module when the base has no such tensor.
MergedLayout PlanMergedLayout(const safetensors::ModelWeights& base,
                              const std::vector<std::string>& modules, std::optional<DType> dtype,
                              uint64_t max_shard_bytes, int world_size);

// model.safetensors.index.json as save_pretrained writes it; only for more than one shard.
nlohmann::ordered_json IndexJson(const MergedLayout& layout);

}  // namespace adapter_job::merge
