#include "adapter_job/core/tensor.h"

#include <algorithm>
#include <cstring>

#include "adapter_job/core/checked_math.h"

namespace adapter_job {

Tensor Tensor::Zeros(DType dtype, std::vector<int64_t> shape) {
  const uint64_t bytes =
      CheckedMul(CheckedNumel(shape, "tensor shape"), ItemSize(dtype), "tensor byte size");
  Tensor t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.resize(bytes);
  return t;
}

uint64_t Tensor::numel() const { return CheckedNumel(shape, "tensor shape"); }

std::vector<int64_t> ContiguousStrides(std::span<const int64_t> shape) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (std::size_t i = shape.size(); i-- > 1;)
    strides[i - 1] = strides[i] * std::max<int64_t>(shape[i], 1);
  return strides;
}

std::string ShapeToString(std::span<const int64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

namespace {

// Walks every index of `shape` but the last, copying one innermost row per step.
void CopyStrided(const StridedView& src, std::byte* dst_base,
                 std::span<const int64_t> dst_strides) {
  const std::size_t rank = src.shape.size();
  const std::size_t item = ItemSize(src.dtype);
  for (int64_t dim : src.shape) {
    if (dim == 0) return;
  }
  if (rank == 0) {
    std::memcpy(dst_base, src.base, item);
    return;
  }
  const int64_t inner = src.shape[rank - 1];
  const int64_t src_inner_stride = src.strides[rank - 1];
  const int64_t dst_inner_stride = dst_strides[rank - 1];
  const bool rows_contiguous = src_inner_stride == 1 && dst_inner_stride == 1;
  std::vector<int64_t> index(rank - 1, 0);
  while (true) {
    int64_t src_offset = 0;
    int64_t dst_offset = 0;
    for (std::size_t d = 0; d + 1 < rank; ++d) {
      src_offset += index[d] * src.strides[d];
      dst_offset += index[d] * dst_strides[d];
    }
    const std::byte* s = src.base + src_offset * static_cast<int64_t>(item);
    std::byte* d = dst_base + dst_offset * static_cast<int64_t>(item);
    if (rows_contiguous) {
      std::memcpy(d, s, static_cast<std::size_t>(inner) * item);
    } else {
      for (int64_t i = 0; i < inner; ++i) {
        std::memcpy(d + i * dst_inner_stride * static_cast<int64_t>(item),
                    s + i * src_inner_stride * static_cast<int64_t>(item), item);
      }
    }
    std::size_t d_idx = rank - 1;
    while (d_idx > 0) {
      if (++index[d_idx - 1] < src.shape[d_idx - 1]) break;
      index[d_idx - 1] = 0;
      --d_idx;
    }
    if (d_idx == 0) return;
  }
}

}  // namespace

void CopyIntoBlock(const StridedView& source, std::byte* dest, std::span<const int64_t> dest_shape,
                   std::span<const int64_t> dest_offsets) {
  const auto dest_strides = ContiguousStrides(dest_shape);
  int64_t base = 0;
  for (std::size_t d = 0; d < dest_offsets.size(); ++d) base += dest_offsets[d] * dest_strides[d];
  CopyStrided(source, dest + base * static_cast<int64_t>(ItemSize(source.dtype)), dest_strides);
}

void CopyIntoBlock(const StridedView& source, Tensor& dest, std::span<const int64_t> dest_offsets) {
  CopyIntoBlock(source, dest.data.data(), dest.shape, dest_offsets);
}

Tensor ToContiguous(const StridedView& source) {
  Tensor out = Tensor::Zeros(source.dtype, source.shape);
  CopyStrided(source, out.data.data(), ContiguousStrides(out.shape));
  return out;
}

void SwapByteOrder(Tensor& tensor) {
  const std::size_t item = ItemSize(tensor.dtype);
  // Complex values swap each of their two parts.
  const bool complex = tensor.dtype == DType::kComplex64 || tensor.dtype == DType::kComplex128 ||
                       tensor.dtype == DType::kComplex32;
  const std::size_t part = complex ? item / 2 : item;
  for (std::size_t i = 0; i + part <= tensor.data.size(); i += part) {
    std::reverse(tensor.data.begin() + static_cast<std::ptrdiff_t>(i),
                 tensor.data.begin() + static_cast<std::ptrdiff_t>(i + part));
  }
}

}  // namespace adapter_job
