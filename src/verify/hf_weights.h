// The base model's weights, read from its safetensors files one tensor at a time, so a model
// larger than memory can still be walked layer by layer. Headers come from a mapping; tensor
// bytes are read with pread (several threads for large tensors) into pinned memory when bound for
// a GPU: page faults on a mapping of many GiB cost more than the reading itself, above all in VMs.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "adapter_job/core/file.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::verify {

class HfWeights {
 public:
  // `model_dir` holds model.safetensors or model.safetensors.index.json with its shards.
  static HfWeights Open(const std::filesystem::path& model_dir);

  bool Has(const std::string& name) const { return location_.contains(name); }
  // The tensor converted to `dtype` on `device`.
  at::Tensor Get(const std::string& name, const at::Device& device, at::ScalarType dtype) const;
  std::vector<int64_t> Shape(const std::string& name) const;

 private:
  struct Shard {
    safetensors::File file;  // the header, and where each tensor's bytes are
    ReadOnlyFile data;
  };
  std::vector<std::unique_ptr<Shard>> shards_;
  std::map<std::string, std::pair<const Shard*, const safetensors::TensorEntry*>> location_;
};

at::ScalarType ToTorch(DType dtype);

}  // namespace adapter_job::verify
