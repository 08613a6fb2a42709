#include "adapter_job/merge/merge_math.h"

#include <cmath>
#include <cstring>
#include <thread>

#include "adapter_job/core/dtype_cast.h"
#include "adapter_job/core/error.h"

namespace adapter_job::merge {
namespace {

template <typename Bits>
Bits Load(const std::byte* p) {
  Bits bits;
  std::memcpy(&bits, p, sizeof bits);
  return bits;
}

// Rows [begin, end): each gets s·Σ_k B[o,k]·A[k,:] added, a rank-1 update at a time, so the row
// stays in cache while A streams through.
void MergeRows(float* weight, int64_t begin, int64_t end, int64_t in, const LowRankUpdate& u) {
  for (int64_t o = begin; o < end; ++o) {
    float* row = weight + o * in;
    for (int64_t k = 0; k < u.rank; ++k) {
      const float c = static_cast<float>(u.scale * u.b[o * u.rank + k]);
      const float* a = u.a.data() + k * in;
      for (int64_t i = 0; i < in; ++i) row[i] += c * a[i];
    }
    if (u.magnitude.empty()) continue;
    double sum = 0;
    for (int64_t i = 0; i < in; ++i) sum += static_cast<double>(row[i]) * row[i];
    const float factor = static_cast<float>(u.magnitude[o] / std::sqrt(sum));
    for (int64_t i = 0; i < in; ++i) row[i] *= factor;
  }
}

}  // namespace

std::vector<float> ToFloat32(std::span<const std::byte> bytes, DType dtype) {
  const std::size_t item = ItemSize(dtype);
  std::vector<float> values(bytes.size() / item);
  const std::byte* p = bytes.data();
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(values.data(), p, values.size() * sizeof(float));
      break;
    case DType::kBFloat16:
      for (std::size_t i = 0; i < values.size(); ++i)
        values[i] = BFloat16ToFloat(Load<uint16_t>(p + 2 * i));
      break;
    case DType::kFloat16:
      for (std::size_t i = 0; i < values.size(); ++i)
        values[i] = HalfToFloat(Load<uint16_t>(p + 2 * i));
      break;
    default:
      Fail("cannot merge {} weights: only float32, bfloat16 and float16 are merged",
           TorchName(dtype));
  }
  return values;
}

void FromFloat32(std::span<const float> values, DType dtype, std::span<std::byte> out) {
  std::byte* p = out.data();
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(p, values.data(), values.size() * sizeof(float));
      return;
    case DType::kBFloat16:
      for (std::size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits = FloatToBFloat16(values[i]);
        std::memcpy(p + 2 * i, &bits, 2);
      }
      return;
    case DType::kFloat16:
      for (std::size_t i = 0; i < values.size(); ++i) {
        const uint16_t bits = FloatToHalf(values[i]);
        std::memcpy(p + 2 * i, &bits, 2);
      }
      return;
    default:
      Fail("cannot write merged weights as {}", TorchName(dtype));
  }
}

void MergeInto(std::span<float> weight, int64_t out, int64_t in, const LowRankUpdate& update,
               int threads) {
  threads = std::max(1, std::min<int>(threads, static_cast<int>(std::max<int64_t>(out / 64, 1))));
  if (threads == 1) return MergeRows(weight.data(), 0, out, in, update);
  std::vector<std::jthread> workers;
  const int64_t per = (out + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * per, end = std::min(out, begin + per);
    if (begin >= end) break;
    workers.emplace_back([&, begin, end] { MergeRows(weight.data(), begin, end, in, update); });
  }
}

}  // namespace adapter_job::merge
