// The base model's tensor shapes against its config.json, checked from the safetensors headers
// before the forward pass reads a byte: a header that lies about a shape (same bytes, other
// dimensions) would otherwise surface as a libtorch error deep in a matmul (exit 1), or, where
// the shape broadcasts, as a quietly wrong forward pass.
#pragma once

#include "adapter_job/convert/hf_config.h"
#include "decoder_forward.h"
#include "hf_weights.h"

namespace adapter_job::verify {

// Throws FormatError naming the safetensors file, the tensor, its shape and the expected one.
void CheckBaseShapes(const HfWeights& base, const convert::HfModelConfig& config,
                     const LlamaSettings& settings);

}  // namespace adapter_job::verify
