#include "adapter_job/core/dtype.h"

#include <array>

namespace adapter_job {
namespace {

struct DTypeInfo {
  DType dtype;
  std::size_t item_size;
  std::string_view torch_name;
  std::string_view storage_class;  // empty: only `_rebuild_tensor_v3` stores it
  std::string_view safetensors_name;
  bool floating_point;
};

constexpr std::array kDTypes = {
    DTypeInfo{DType::kBool, 1, "bool", "BoolStorage", "BOOL", false},
    DTypeInfo{DType::kUInt8, 1, "uint8", "ByteStorage", "U8", false},
    DTypeInfo{DType::kInt8, 1, "int8", "CharStorage", "I8", false},
    DTypeInfo{DType::kFloat8E5M2, 1, "float8_e5m2", "", "F8_E5M2", true},
    DTypeInfo{DType::kFloat8E4M3Fn, 1, "float8_e4m3fn", "", "F8_E4M3", true},
    DTypeInfo{DType::kFloat8E8M0Fnu, 1, "float8_e8m0fnu", "", "F8_E8M0", true},
    DTypeInfo{DType::kInt16, 2, "int16", "ShortStorage", "I16", false},
    DTypeInfo{DType::kUInt16, 2, "uint16", "", "U16", false},
    DTypeInfo{DType::kFloat16, 2, "float16", "HalfStorage", "F16", true},
    DTypeInfo{DType::kBFloat16, 2, "bfloat16", "BFloat16Storage", "BF16", true},
    DTypeInfo{DType::kInt32, 4, "int32", "IntStorage", "I32", false},
    DTypeInfo{DType::kUInt32, 4, "uint32", "", "U32", false},
    DTypeInfo{DType::kFloat32, 4, "float32", "FloatStorage", "F32", true},
    DTypeInfo{DType::kComplex64, 8, "complex64", "ComplexFloatStorage", "C64", true},
    DTypeInfo{DType::kFloat64, 8, "float64", "DoubleStorage", "F64", true},
    DTypeInfo{DType::kInt64, 8, "int64", "LongStorage", "I64", false},
    DTypeInfo{DType::kUInt64, 8, "uint64", "", "U64", false},
    DTypeInfo{DType::kFloat8E5M2Fnuz, 1, "float8_e5m2fnuz", "", "", true},
    DTypeInfo{DType::kFloat8E4M3Fnuz, 1, "float8_e4m3fnuz", "", "", true},
    DTypeInfo{DType::kComplex128, 16, "complex128", "ComplexDoubleStorage", "", true},
    DTypeInfo{DType::kComplex32, 4, "complex32", "", "", true},
};

const DTypeInfo& Info(DType dtype) { return kDTypes[static_cast<std::size_t>(dtype)]; }

static_assert([] {
  for (std::size_t i = 0; i < kDTypes.size(); ++i) {
    if (static_cast<std::size_t>(kDTypes[i].dtype) != i) return false;
  }
  return true;
}());

}  // namespace

std::size_t ItemSize(DType dtype) { return Info(dtype).item_size; }
std::string_view TorchName(DType dtype) { return Info(dtype).torch_name; }
bool IsFloatingPoint(DType dtype) { return Info(dtype).floating_point; }

std::optional<std::string_view> SafetensorsName(DType dtype) {
  const auto name = Info(dtype).safetensors_name;
  if (name.empty()) return std::nullopt;
  return name;
}

std::optional<DType> DTypeFromTorchName(std::string_view name) {
  // Python aliases that can appear in `torch.<alias>` globals.
  if (name == "float") return DType::kFloat32;
  if (name == "double") return DType::kFloat64;
  if (name == "half") return DType::kFloat16;
  if (name == "long") return DType::kInt64;
  if (name == "int") return DType::kInt32;
  if (name == "short") return DType::kInt16;
  if (name == "cfloat") return DType::kComplex64;
  if (name == "cdouble") return DType::kComplex128;
  if (name == "chalf") return DType::kComplex32;
  for (const auto& info : kDTypes) {
    if (info.torch_name == name) return info.dtype;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromStorageClass(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (!info.storage_class.empty() && info.storage_class == name) return info.dtype;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromSafetensorsName(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (!info.safetensors_name.empty() && info.safetensors_name == name) return info.dtype;
  }
  return std::nullopt;
}

}  // namespace adapter_job
