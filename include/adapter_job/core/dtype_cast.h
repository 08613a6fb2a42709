// Element type conversion between the floating types adapters are stored in. float32 -> bf16/fp16
// rounds to nearest even (as torch's .to() does); widening is exact.
#pragma once

#include "adapter_job/core/tensor.h"

namespace adapter_job {

// Returns `tensor` converted to `dtype`; a no-op copy when the dtype already matches.
Tensor CastTensor(const Tensor& tensor, DType dtype);

float BFloat16ToFloat(uint16_t bits);
uint16_t FloatToBFloat16(float value);
float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);

}  // namespace adapter_job
