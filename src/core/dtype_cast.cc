#include "adapter_job/core/dtype_cast.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "adapter_job/core/error.h"

namespace adapter_job {

float BFloat16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t FloatToBFloat16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // stay a quiet NaN
  const uint32_t rounding = 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f;
  const uint32_t mantissa = h & 0x3ff;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000 | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal (or zero): value = mantissa * 2^-24.
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

uint16_t FloatToHalf(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const float magnitude = std::fabs(value);
  if (std::isnan(value)) return static_cast<uint16_t>(sign | 0x7e00);
  if (magnitude >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00);  // rounds to infinity
  if (magnitude < 6.103515625e-05f) {
    // Subnormal range: round magnitude / 2^-24 to nearest even.
    return static_cast<uint16_t>(sign |
                                 static_cast<uint16_t>(std::nearbyint(magnitude * 16777216.0f)));
  }
  const uint32_t abs_bits = bits & 0x7fffffff;
  const uint32_t rounded = abs_bits + 0xfff + ((abs_bits >> 13) & 1);
  return static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13));
}

namespace {

float LoadAsFloat(DType dtype, const std::byte* p) {
  uint16_t h;
  switch (dtype) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::kBFloat16:
      std::memcpy(&h, p, 2);
      return BFloat16ToFloat(h);
    case DType::kFloat16:
      std::memcpy(&h, p, 2);
      return HalfToFloat(h);
    default:
      Fail("cannot convert from {}", TorchName(dtype));
  }
}

void StoreFloat(DType dtype, float value, std::byte* p) {
  uint16_t h;
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(p, &value, 4);
      return;
    case DType::kBFloat16:
      h = FloatToBFloat16(value);
      std::memcpy(p, &h, 2);
      return;
    case DType::kFloat16:
      h = FloatToHalf(value);
      std::memcpy(p, &h, 2);
      return;
    default:
      Fail("cannot convert to {}", TorchName(dtype));
  }
}

}  // namespace

Tensor CastTensor(const Tensor& tensor, DType dtype) {
  if (tensor.dtype == dtype) return tensor;
  Tensor out = Tensor::Zeros(dtype, tensor.shape);
  const std::size_t in_item = ItemSize(tensor.dtype);
  const std::size_t out_item = ItemSize(dtype);
  const uint64_t n = tensor.numel();
  for (uint64_t i = 0; i < n; ++i) {
    StoreFloat(dtype, LoadAsFloat(tensor.dtype, tensor.data.data() + i * in_item),
               out.data.data() + i * out_item);
  }
  return out;
}

}  // namespace adapter_job
