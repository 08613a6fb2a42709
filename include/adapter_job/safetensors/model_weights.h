// An HF model's weights: model.safetensors, or the shards a model.safetensors.index.json names,
// as one map from tensor name to where its bytes are. Only headers are read up front; tensor
// bytes are read with pread when asked for, so a model larger than memory can be walked tensor by
// tensor (the merge) or layer by layer (verification).
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

namespace adapter_job::safetensors {

class ModelWeights {
 public:
  // Throws FormatError naming the file (and key) for a missing or malformed weights file, an
  // index entry whose shard lacks it, or a tensor found in two shards. A tensor a shard holds but
  // the index does not list there is not the model's (transformers ignores it too).
  static ModelWeights Open(const std::filesystem::path& model_dir);

  struct Tensor {
    std::size_t file = 0;  // into files()
    TensorEntry entry;
    uint64_t offset = 0;  // of its first byte in the file
  };
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  const Tensor* Find(const std::string& name) const;
  const std::filesystem::path& PathOf(const Tensor& tensor) const;
  const ReadOnlyFile& FileOf(const Tensor& tensor) const { return files_.at(tensor.file); }
  // Reads `out.size()` bytes of the tensor from byte `from` of it.
  void Read(const Tensor& tensor, uint64_t from, std::span<std::byte> out) const;
  uint64_t bytes_read() const;

 private:
  std::vector<ReadOnlyFile> files_;
  std::map<std::string, Tensor> tensors_;
};

}  // namespace adapter_job::safetensors
