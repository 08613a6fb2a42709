#include "adapter_job/merge/merge_math.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <thread>

#include "adapter_job/core/dtype_cast.h"
#include "adapter_job/core/error.h"

// The loops below are where a merge spends its compute: built for AVX2/FMA as well where the
// CPU has them (picked at load time), and plain x86-64 otherwise.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADAPTER_JOB_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ADAPTER_JOB_VECTOR_CLONES
#endif

namespace adapter_job::merge {
namespace {

bool Supported(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kBFloat16 || dtype == DType::kFloat16;
}

// bfloat16 is the top half of a float32: widening is a shift, rounding adds half an ulp with
// ties to even. A NaN is written as the canonical quiet NaN in every dtype: the sign and payload
// that arithmetic gives a NaN differ between processors (x86 and CUDA), the merged bytes must not.
ADAPTER_JOB_VECTOR_CLONES
void WidenBFloat16(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(static_cast<uint32_t>(in[i]) << 16);
}

ADAPTER_JOB_VECTOR_CLONES
void RoundToBFloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(in[i]);
    const uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
    const bool nan = (bits & 0x7fffffff) > 0x7f800000;
    out[i] = static_cast<uint16_t>(nan ? kBFloat16NaN : rounded);
  }
}

ADAPTER_JOB_VECTOR_CLONES
void CopyFloat32(const float* in, uint32_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = std::bit_cast<uint32_t>(in[i]);
    out[i] = (bits & 0x7fffffff) > 0x7f800000 ? kFloat32NaN : bits;
  }
}

// One rank-1 update after another, so the row stays in cache while lora_A streams through.
ADAPTER_JOB_VECTOR_CLONES
void AddLowRank(float* row, const float* a, const float* b_row, int64_t rank, int64_t cols,
                float scale) {
  for (int64_t k = 0; k < rank; ++k) {
    const float c = scale * b_row[k];
    const float* a_row = a + k * cols;
    for (int64_t i = 0; i < cols; ++i) row[i] += c * a_row[i];
  }
}

// In double over kNormLanes interleaved lanes, the lanes then added pairwise: the order a GPU
// block of kNormLanes threads follows (device_merge.cu), so that both give the same bits. Each
// product of two floats is exact in double.
ADAPTER_JOB_VECTOR_CLONES
double SquaredNorm(const float* row, int64_t cols) {
  double lanes[kNormLanes] = {};
  int64_t base = 0;
  for (; base + kNormLanes <= cols; base += kNormLanes) {
    for (int j = 0; j < kNormLanes; ++j) {
      const double x = row[base + j];
      lanes[j] += x * x;
    }
  }
  for (int j = 0; base + j < cols; ++j) {
    const double x = row[base + j];
    lanes[j] += x * x;
  }
  for (int width = kNormLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

void Widen(const std::byte* in, DType dtype, float* out, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(out, in, n * sizeof(float));
      return;
    case DType::kBFloat16:
      return WidenBFloat16(reinterpret_cast<const uint16_t*>(in), out, n);
    default:  // float16: rare in checkpoints, converted one element at a time
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        out[i] = HalfToFloat(h);
      }
  }
}

void Round(const float* in, DType dtype, std::byte* out, int64_t n) {
  switch (dtype) {
    case DType::kFloat32:
      return CopyFloat32(in, reinterpret_cast<uint32_t*>(out), n);
    case DType::kBFloat16:
      return RoundToBFloat16(in, reinterpret_cast<uint16_t*>(out), n);
    default:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = std::isnan(in[i]) ? kFloat16NaN : FloatToHalf(in[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
  }
}

void MergeRowRange(std::span<const std::byte> in, DType in_dtype, std::span<std::byte> out,
                   DType out_dtype, int64_t first_row, int64_t begin, int64_t end, int64_t cols,
                   const LowRankUpdate* u) {
  std::vector<float> row(cols);
  const std::size_t in_item = ItemSize(in_dtype), out_item = ItemSize(out_dtype);
  for (int64_t r = begin; r < end; ++r) {
    Widen(in.data() + r * cols * in_item, in_dtype, row.data(), cols);
    if (u) {
      const int64_t o = first_row + r;
      const int64_t expert = u->rows_per_expert > 0 ? o / u->rows_per_expert : 0;
      AddLowRank(row.data(), u->a.data() + expert * u->rank * cols, u->b.data() + o * u->rank,
                 u->rank, cols, static_cast<float>(u->scale));
      if (!u->magnitude.empty()) {
        const float factor =
            static_cast<float>(u->magnitude[o] / std::sqrt(SquaredNorm(row.data(), cols)));
        for (float& x : row) x *= factor;
      }
    }
    Round(row.data(), out_dtype, out.data() + r * cols * out_item, cols);
  }
}

}  // namespace

std::vector<float> ToFloat32(std::span<const std::byte> bytes, DType dtype) {
  if (!Supported(dtype))
    Fail("cannot merge {} weights: only float32, bfloat16 and float16 are merged",
         TorchName(dtype));
  std::vector<float> values(bytes.size() / ItemSize(dtype));
  Widen(bytes.data(), dtype, values.data(), static_cast<int64_t>(values.size()));
  return values;
}

void MergeRows(std::span<const std::byte> in, DType in_dtype, std::span<std::byte> out,
               DType out_dtype, int64_t first_row, int64_t rows, int64_t cols,
               const LowRankUpdate* update, int threads) {
  if (!Supported(in_dtype) || !Supported(out_dtype))
    Fail("cannot merge {} weights into {}: only float32, bfloat16 and float16 are merged",
         TorchName(in_dtype), TorchName(out_dtype));
  // Enough rows per thread to be worth starting it (a row of 4096 takes microseconds).
  const int64_t per_thread_min = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(cols, 1));
  threads = static_cast<int>(std::clamp<int64_t>(rows / per_thread_min, 1, std::max(threads, 1)));
  if (threads == 1)
    return MergeRowRange(in, in_dtype, out, out_dtype, first_row, 0, rows, cols, update);
  std::vector<std::jthread> workers;
  const int64_t per = (rows + threads - 1) / threads;
  for (int64_t begin = 0; begin < rows; begin += per) {
    workers.emplace_back([&, begin] {
      MergeRowRange(in, in_dtype, out, out_dtype, first_row, begin, std::min(rows, begin + per),
                    cols, update);
    });
  }
}

}  // namespace adapter_job::merge
