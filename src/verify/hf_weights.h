// An HF model's weights (safetensors::ModelWeights, as the merge reads them) as torch tensors,
// read one tensor at a time, so a model larger than memory can still be walked layer by layer.
// Tensor bytes are read with pread (several threads for large pieces), for a GPU through two
// reused pinned buffers: page faults on a mapping of many GiB, or on fresh host memory, cost more
// than the reading itself, above all in VMs.
#pragma once

#include <ATen/ATen.h>

#include <filesystem>
#include <optional>
#include <string>

#include "adapter_job/core/file.h"
#include "adapter_job/safetensors/model_weights.h"

namespace adapter_job::verify {

class HfWeights {
 public:
  // `model_dir` holds model.safetensors or model.safetensors.index.json with its shards.
  static HfWeights Open(const std::filesystem::path& model_dir);

  // A tensor of that name, or one stored as MXFP4 ("<name>_blocks" and "<name>_scales", as the
  // GPT-OSS hub checkpoints store the experts).
  bool Has(const std::string& name) const {
    return weights_.Find(name) != nullptr || Mxfp4(name).has_value();
  }
  // The tensor converted to `dtype` on `device`; an MXFP4 one dequantized as transformers does it
  // (integrations/mxfp4.py convert_moe_packed_tensors: [..., out, in] transposed to [..., in,
  // out]).
  at::Tensor Get(const std::string& name, const at::Device& device, at::ScalarType dtype) const;
  std::vector<int64_t> Shape(const std::string& name) const;
  DType DTypeOf(const std::string& name) const { return Entry(name).entry.dtype; }
  // The safetensors file that holds `name` (its blocks, for an MXFP4 one).
  const std::filesystem::path& FileOf(const std::string& name) const {
    const auto mxfp4 = Mxfp4(name);
    return weights_.PathOf(mxfp4 ? *mxfp4->blocks : Entry(name));
  }

 private:
  static constexpr uint64_t kStagingBytes = 64ULL << 20;
  explicit HfWeights(safetensors::ModelWeights weights) : weights_(std::move(weights)) {}
  // FormatError "the base model has no tensor ..." when it has none of that name.
  const safetensors::ModelWeights::Tensor& Entry(const std::string& name) const;
  struct Mxfp4Parts {
    const safetensors::ModelWeights::Tensor* blocks;  // uint8 [..., out, in / 32, 16]
    const safetensors::ModelWeights::Tensor* scales;  // uint8 [..., out, in / 32]
  };
  // Set when `name` itself is absent and both MXFP4 parts are there; FormatError when their
  // shapes or dtypes are not MXFP4's.
  std::optional<Mxfp4Parts> Mxfp4(const std::string& name) const;
  at::Tensor Raw(const safetensors::ModelWeights::Tensor& tensor, const at::Device& device) const;
  at::Tensor CopyToDevice(const ReadOnlyFile& file, uint64_t offset, uint64_t size,
                          const at::Device& device) const;

  safetensors::ModelWeights weights_;
  mutable std::vector<at::Tensor> staging_;  // two pinned buffers, made on first use
};

at::ScalarType ToTorch(DType dtype);

}  // namespace adapter_job::verify
