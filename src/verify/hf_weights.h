// The base model's weights, read from its safetensors files by mmap: only the tensors asked for
// are touched, one at a time, so a model larger than memory can still be walked layer by layer.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::verify {

class HfWeights {
 public:
  // `model_dir` holds model.safetensors or model.safetensors.index.json with its shards.
  static HfWeights Open(const std::filesystem::path& model_dir);

  bool Has(const std::string& name) const { return location_.contains(name); }
  // The tensor converted to `dtype` on `device` (a copy: the mapping stays read-only).
  at::Tensor Get(const std::string& name, const at::Device& device, at::ScalarType dtype) const;
  std::vector<int64_t> Shape(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<safetensors::File>> files_;
  std::map<std::string, std::pair<const safetensors::File*, const safetensors::TensorEntry*>>
      location_;
};

at::ScalarType ToTorch(DType dtype);

}  // namespace adapter_job::verify
