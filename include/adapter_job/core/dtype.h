// Element types as PyTorch, DCP and safetensors name them.
#pragma once

#include <cstddef>
#include <optional>
#include <string_view>

namespace adapter_job {

// Declared in safetensors' own order (its Rust `Dtype`), which writers sort by.
enum class DType {
  kBool,
  kUInt8,
  kInt8,
  kFloat8E5M2,
  kFloat8E4M3Fn,
  kFloat8E8M0Fnu,
  kInt16,
  kUInt16,
  kFloat16,
  kBFloat16,
  kInt32,
  kUInt32,
  kFloat32,
  kComplex64,
  kFloat64,
  kInt64,
  kUInt64,
  // Not representable in safetensors; readable from checkpoints only.
  kFloat8E5M2Fnuz,
  kFloat8E4M3Fnuz,
  kComplex128,
  kComplex32,
};

std::size_t ItemSize(DType dtype);

// "bfloat16", as in `torch.bfloat16`.
std::string_view TorchName(DType dtype);
std::optional<DType> DTypeFromTorchName(std::string_view name);

// Legacy typed-storage class names used by `_rebuild_tensor_v2`, e.g. "BFloat16Storage".
std::optional<DType> DTypeFromStorageClass(std::string_view name);

// "BF16"; nullopt when safetensors has no such dtype.
std::optional<std::string_view> SafetensorsName(DType dtype);
std::optional<DType> DTypeFromSafetensorsName(std::string_view name);

bool IsFloatingPoint(DType dtype);

}  // namespace adapter_job
