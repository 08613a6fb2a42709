// Arithmetic on sizes read from untrusted files: overflow is an input error, never UB.
#pragma once

#include <cstdint>
#include <span>

#include "adapter_job/core/error.h"

namespace adapter_job {

inline uint64_t CheckedAdd(uint64_t a, uint64_t b, const char* what) {
  uint64_t out;
  if (__builtin_add_overflow(a, b, &out)) Fail("{} overflows: {} + {}", what, a, b);
  return out;
}

inline uint64_t CheckedMul(uint64_t a, uint64_t b, const char* what) {
  uint64_t out;
  if (__builtin_mul_overflow(a, b, &out)) Fail("{} overflows: {} * {}", what, a, b);
  return out;
}

// Product of dimensions; every dimension must be non-negative.
inline uint64_t CheckedNumel(std::span<const int64_t> shape, const char* what) {
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) Fail("{} has a negative dimension {}", what, dim);
    numel = CheckedMul(numel, static_cast<uint64_t>(dim), what);
  }
  return numel;
}

}  // namespace adapter_job
