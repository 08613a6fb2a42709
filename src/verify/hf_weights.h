// An HF model's weights (safetensors::ModelWeights, as the merge reads them) as torch tensors,
// read one tensor at a time, so a model larger than memory can still be walked layer by layer.
// Tensor bytes are read with pread (several threads for large pieces), for a GPU through two
// reused pinned buffers: page faults on a mapping of many GiB, or on fresh host memory, cost more
// than the reading itself, above all in VMs.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <string>

#include "adapter_job/core/file.h"
#include "adapter_job/safetensors/model_weights.h"

namespace adapter_job::verify {

class HfWeights {
 public:
  // `model_dir` holds model.safetensors or model.safetensors.index.json with its shards.
  static HfWeights Open(const std::filesystem::path& model_dir);

  bool Has(const std::string& name) const { return weights_.Find(name) != nullptr; }
  // The tensor converted to `dtype` on `device`.
  at::Tensor Get(const std::string& name, const at::Device& device, at::ScalarType dtype) const;
  std::vector<int64_t> Shape(const std::string& name) const { return Entry(name).entry.shape; }
  DType DTypeOf(const std::string& name) const { return Entry(name).entry.dtype; }
  // The safetensors file that holds `name`.
  const std::filesystem::path& FileOf(const std::string& name) const {
    return weights_.PathOf(Entry(name));
  }

 private:
  static constexpr uint64_t kStagingBytes = 64ULL << 20;
  explicit HfWeights(safetensors::ModelWeights weights) : weights_(std::move(weights)) {}
  // FormatError "the base model has no tensor ..." when it has none of that name.
  const safetensors::ModelWeights::Tensor& Entry(const std::string& name) const;
  at::Tensor CopyToDevice(const ReadOnlyFile& file, uint64_t offset, uint64_t size,
                          const at::Device& device) const;

  safetensors::ModelWeights weights_;
  mutable std::vector<at::Tensor> staging_;  // two pinned buffers, made on first use
};

at::ScalarType ToTorch(DType dtype);

}  // namespace adapter_job::verify
