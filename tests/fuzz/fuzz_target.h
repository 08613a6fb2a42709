// Shared by the libFuzzer targets: the input as bytes, and the one outcome allowed besides
// success. A parser may reject any input with adapter_job::Error (a clear message); anything else
// (a crash, a sanitizer report, another exception, a hang) is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "adapter_job/core/error.h"

template <typename Parse>
int FuzzOne(const uint8_t* data, size_t size, Parse&& parse) {
  try {
    parse(std::span<const std::byte>(reinterpret_cast<const std::byte*>(data), size));
  } catch (const adapter_job::Error&) {
  }
  return 0;
}
