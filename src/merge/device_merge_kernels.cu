// merge_math.cc's loops as CUDA kernels, operation for operation: every float32 product and sum
// is rounded on its own (__fmul_rn/__fadd_rn: nvcc would otherwise fuse them), the DoRA norm
// follows the CPU's lane order, and bfloat16/float16 are rounded by the same bit operations.
#include <cuda_fp16.h>

#include <algorithm>

#include "device_merge_kernels.h"

namespace adapter_job::merge::kernels {
namespace {

__device__ float Widen(const void* in, Element type, int64_t i) {
  switch (type) {
    case Element::kFloat32:
      return static_cast<const float*>(in)[i];
    case Element::kBFloat16:
      return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(in)[i]) << 16);
    default:
      return __half2float(static_cast<const __half*>(in)[i]);
  }
}

// merge_math.cc's Round: to nearest even, a NaN as the canonical quiet NaN of the dtype
// (kNaN32 and the others are merge_math.h's kFloat32NaN, ...; device_merge.cc checks).
__device__ void Round(float x, Element type, void* out, int64_t i) {
  const uint32_t bits = __float_as_uint(x);
  const bool nan = (bits & 0x7fffffff) > 0x7f800000;
  switch (type) {
    case Element::kFloat32:
      static_cast<uint32_t*>(out)[i] = nan ? kNaN32 : bits;
      return;
    case Element::kBFloat16: {
      const uint32_t rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16;
      static_cast<uint16_t*>(out)[i] = static_cast<uint16_t>(nan ? kNaNBFloat16 : rounded);
      return;
    }
    default:
      static_cast<uint16_t*>(out)[i] = nan ? kNaNFloat16 : __half_as_ushort(__float2half_rn(x));
  }
}

// W + s·B·A for every element, one rank-1 term after another as AddLowRank adds them; rounded
// into `out`, or kept in float32 (`scratch`) for DoRA's norm.
__global__ void MergeElements(const void* in, Element in_type, int64_t first_row, int64_t rows,
                              int64_t cols, Update u, bool with_update, float* scratch, void* out,
                              Element out_type) {
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x = Widen(in, in_type, e);
    if (with_update) {
      const int64_t r = e / cols, i = e - r * cols;
      const float* b_row = u.b + (first_row + r) * u.rank;
      for (int64_t k = 0; k < u.rank; ++k) {
        const float c = __fmul_rn(u.scale, b_row[k]);
        x = __fadd_rn(x, __fmul_rn(c, u.a[k * cols + i]));
      }
    }
    if (scratch) {
      scratch[e] = x;
    } else {
      Round(x, out_type, out, e);
    }
  }
}

// DoRA: each row times m / ‖row‖, one block of kThreads per row, the squared norm summed as
// merge_math.cc's SquaredNorm sums it (lane j takes elements j, j + kThreads, ...; then the
// lanes pairwise).
__global__ void ScaleRows(const float* merged, int64_t first_row, int64_t rows, int64_t cols,
                          const float* magnitude, void* out, Element out_type) {
  __shared__ double lanes[kThreads];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = merged + r * cols;
    double sum = 0;
    for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
      const double x = row[i];
      sum = __dadd_rn(sum, __dmul_rn(x, x));
    }
    lanes[threadIdx.x] = sum;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width)
        lanes[threadIdx.x] = __dadd_rn(lanes[threadIdx.x], lanes[threadIdx.x + width]);
      __syncthreads();
    }
    const float factor = __double2float_rn(
        __ddiv_rn(static_cast<double>(magnitude[first_row + r]), __dsqrt_rn(lanes[0])));
    __syncthreads();  // every thread has read lanes[0] before the next row writes it
    for (int64_t i = threadIdx.x; i < cols; i += kThreads)
      Round(__fmul_rn(row[i], factor), out_type, out, r * cols + i);
  }
}

}  // namespace

cudaError_t LaunchMerge(const void* in, Element in_type, void* out, Element out_type,
                        float* scratch, int64_t first_row, int64_t rows, int64_t cols,
                        const Update* update, int max_blocks, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const bool dora = update && update->magnitude;
  const int grid = static_cast<int>(
      std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(max_blocks)));
  MergeElements<<<grid, kThreads, 0, stream>>>(in, in_type, first_row, rows, cols,
                                               update ? *update : Update{}, update != nullptr,
                                               dora ? scratch : nullptr, out, out_type);
  if (const cudaError_t status = cudaGetLastError(); status != cudaSuccess || !dora) return status;
  const int row_grid = static_cast<int>(std::min<int64_t>(rows, max_blocks));
  ScaleRows<<<row_grid, kThreads, 0, stream>>>(scratch, first_row, rows, cols, update->magnitude,
                                               out, out_type);
  return cudaGetLastError();
}

}  // namespace adapter_job::merge::kernels
