// The HF base model's weights as the merge reads them: model.safetensors, or the shards a
// model.safetensors.index.json names. Only headers are read up front; tensors are read one at a
// time with pread, so memory holds the tensor being merged, never the model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "adapter_job/core/file.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::merge {

class BaseWeights {
 public:
  // Throws FormatError naming the file (and key) for a missing or malformed weights file, an
  // index entry whose shard lacks it, or a tensor found in two shards.
  static BaseWeights Open(const std::filesystem::path& model_dir);

  struct Tensor {
    std::size_t file = 0;  // into files()
    safetensors::TensorEntry entry;
    uint64_t offset = 0;  // of its first byte in the file
  };
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  const Tensor* Find(const std::string& name) const;
  const std::filesystem::path& PathOf(const Tensor& tensor) const;
  // Reads `out.size()` bytes of the tensor from byte `from` of it.
  void Read(const Tensor& tensor, uint64_t from, std::span<std::byte> out) const;
  uint64_t bytes_read() const;

 private:
  std::vector<ReadOnlyFile> files_;
  std::map<std::string, Tensor> tensors_;
};

}  // namespace adapter_job::merge
