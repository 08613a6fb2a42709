// The base model's weights, read from its safetensors files one tensor at a time, so a model
// larger than memory can still be walked layer by layer. Headers come from a mapping; tensor
// bytes are read with pread (several threads for large pieces), for a GPU through two reused
// pinned buffers: page faults on a mapping of many GiB, or on fresh host memory, cost more than
// the reading itself, above all in VMs.
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
  DType DTypeOf(const std::string& name) const { return location_.at(name).second->dtype; }
  // The safetensors file that holds `name` (which must exist).
  const std::filesystem::path& FileOf(const std::string& name) const {
    return location_.at(name).first->file.path();
  }

 private:
  static constexpr uint64_t kStagingBytes = 64ULL << 20;
  at::Tensor CopyToDevice(const ReadOnlyFile& file, uint64_t offset, uint64_t size,
                          const at::Device& device) const;

  struct Shard {
    safetensors::File file;  // the header, and where each tensor's bytes are
    ReadOnlyFile data;
  };
  std::vector<std::unique_ptr<Shard>> shards_;
  std::map<std::string, std::pair<const Shard*, const safetensors::TensorEntry*>> location_;
  mutable std::vector<at::Tensor> staging_;  // two pinned buffers, made on first use
};

at::ScalarType ToTorch(DType dtype);

}  // namespace adapter_job::verify
