// Host tensors as raw little-endian bytes: the project moves and reshapes adapter weights but
// never computes on them outside verification, so no numeric library is involved.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "adapter_job/core/dtype.h"

namespace adapter_job {

// A contiguous, row-major tensor that owns its bytes.
struct Tensor {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;

  static Tensor Zeros(DType dtype, std::vector<int64_t> shape);
  uint64_t numel() const;
  std::size_t nbytes() const { return data.size(); }
};

// A strided window onto bytes someone else owns. Strides and offsets count elements.
struct StridedView {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  const std::byte* base = nullptr;  // element 0 (storage offset already applied)
};

std::vector<int64_t> ContiguousStrides(std::span<const int64_t> shape);
std::string ShapeToString(std::span<const int64_t> shape);

// Copies `source` into the block of `dest` that starts at `dest_offsets` (one per dimension).
// The caller has checked that the block lies inside `dest`.
void CopyIntoBlock(const StridedView& source, Tensor& dest, std::span<const int64_t> dest_offsets);
// The same into a contiguous tensor of `dest_shape` at `dest` that someone else owns.
void CopyIntoBlock(const StridedView& source, std::byte* dest, std::span<const int64_t> dest_shape,
                   std::span<const int64_t> dest_offsets);

Tensor ToContiguous(const StridedView& source);

// Reverses the bytes of every element (big-endian sources).
void SwapByteOrder(Tensor& tensor);

}  // namespace adapter_job
