// Nemotron-H's layers in libtorch, matching transformers' NemotronHBlock: a norm, then one mixer
// (a Mamba-2 mixer, attention without RoPE, or a squared-ReLU MLP), then the residual.
#pragma once

#include <ATen/ATen.h>

#include "decoder_forward.h"

namespace adapter_job::verify {

// x: [tokens, hidden] -> [tokens, hidden], layer `layer` of a hybrid (s.hybrid).
at::Tensor HybridLayer(const at::Tensor& x, const LayerWeights& w, const LlamaSettings& s,
                       int64_t layer);

// The Mamba-2 mixer of normed hidden states h [tokens, hidden], as a sequential scan over the
// tokens: exact, and linear in their number, but one token at a time, so it serves the
// verification prompts (a few thousand tokens) of any model size, not long-context throughput.
at::Tensor Mamba2Mixer(const at::Tensor& h, const LayerWeights& w, const Mamba2Settings& m);

}  // namespace adapter_job::verify
