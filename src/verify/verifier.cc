// One pass over the layers: each layer's base weights are read once and serve all variants; only
// one layer's weights are on the device at a time, next to the embedding and output head.
#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>

#include "adapter_job/convert/hf_config.h"
#include "adapter_job/core/error.h"
#include "adapter_job/tokenizer/tokenizer.h"
#include "adapter_job/verify/verify.h"
#include "base_shapes.h"
#include "checks.h"
#include "decoder_forward.h"
#include "hf_weights.h"
#include "megatron_adapter.h"
#include "peft_adapter.h"

namespace adapter_job::verify {
namespace {

namespace fs = std::filesystem;

bool CudaAvailable() { return at::hasCUDA() && at::detail::getCUDAHooks().getNumGPUs() > 0; }

at::Device PickDevice(const std::string& name) {
  if (name == "cpu") return at::kCPU;
  if (name == "cuda") {
    if (!CudaAvailable()) Fail("--verify-device cuda: no CUDA device is available");
    return at::Device(at::kCUDA, 0);
  }
  if (name != "auto") Fail("--verify-device must be auto, cuda or cpu, not '{}'", name);
  return CudaAvailable() ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
}

// A hybrid layer's block: its mixer's linears, its norm and a Mamba mixer's other weights.
LayerWeights LoadHybridLayer(const HfWeights& base, int64_t layer, const LlamaSettings& s,
                             const at::Device& device) {
  const std::string p = fmt::format("{}.{}.", s.layers_prefix, layer);
  const HybridBlock block = s.hybrid.at(static_cast<std::size_t>(layer));
  LayerWeights w;
  for (const std::string& linear : HybridLinearPaths(block)) {
    w.other_linears.emplace(linear, base.Get(p + linear + ".weight", device, at::kFloat));
    if (base.Has(p + linear + ".bias"))
      Fail("the base model's '{}{}.bias' is not modelled in a hybrid", p, linear);
  }
  std::vector<std::string> params = {"norm.weight"};
  if (block == HybridBlock::kMamba) {
    params.insert(params.end(), {"mixer.conv1d.weight", "mixer.A_log", "mixer.D", "mixer.dt_bias",
                                 "mixer.norm.weight"});
    if (base.Has(p + "mixer.conv1d.bias")) params.push_back("mixer.conv1d.bias");
  }
  for (const std::string& name : params)
    w.hybrid_params.emplace(name, base.Get(p + name, device, at::kFloat));
  return w;
}

LayerWeights LoadLayer(const HfWeights& base, int64_t layer, const LlamaSettings& s,
                       const at::Device& device) {
  if (!s.hybrid.empty()) return LoadHybridLayer(base, layer, s, device);
  const std::string p = fmt::format("{}.{}.", s.layers_prefix, layer);
  LayerWeights w;
  const auto load = [&](const std::string& linear) {
    at::Tensor t = base.Get(p + linear + ".weight", device, at::kFloat);
    if (std::find(kDecoderLinears.begin(), kDecoderLinears.end(), linear) != kDecoderLinears.end())
      w.Linear(linear) = std::move(t);
    else
      w.other_linears.emplace(linear, std::move(t));
  };
  // An MoE layer has a router (Qwen3-MoE's mlp_only_layers and DeepSeek-V3's first
  // first_k_dense_replace layers keep a dense MLP).
  const bool sparse = !s.moe.router.empty() && base.Has(p + s.moe.router + ".weight");
  for (const auto& linear : AttentionLinearPaths(s)) load(linear);
  const auto optional = [&](const std::string& name) {
    return base.Has(p + name) ? base.Get(p + name, device, at::kFloat) : at::Tensor();
  };
  if (sparse) {
    // Experts stored fused (GPT-OSS): each expert's linears and biases are views of them.
    for (const FusedExperts& f : s.moe.fused) {
      const at::Tensor fused = base.Get(p + f.parameter, device, at::kFloat);
      const at::Tensor bias = optional(f.parameter + "_bias");
      for (int64_t e = 0; e < s.moe.experts; ++e) {
        const auto weights = SplitFused(fused[e], f.layout, f.linears.size());
        const auto biases =
            bias.defined() ? SplitFused(bias[e], f.layout, f.linears.size()) : weights;
        for (std::size_t k = 0; k < f.linears.size(); ++k) {
          const std::string path = convert::ExpertPath(s.moe.expert[f.linears[k]], e);
          w.other_linears.emplace(path, weights[k]);
          w.stored_as.emplace(path + ".weight", f.parameter);
          if (bias.defined()) {
            w.biases.emplace(path, biases[k]);
            w.stored_as.emplace(path + ".bias", f.parameter + "_bias");
          }
        }
      }
    }
    for (const auto& linear : SparseMlpPaths(s)) {
      if (!w.other_linears.contains(linear)) load(linear);
    }
    const std::string bias = p + s.moe.router + ".e_score_correction_bias";
    if (s.moe.sigmoid && base.Has(bias)) w.router_bias = base.Get(bias, device, at::kFloat);
    if (at::Tensor logit_bias = optional(s.moe.router + ".bias"); logit_bias.defined())
      w.biases.emplace(s.moe.router, std::move(logit_bias));
  } else {
    for (const auto& linear : DenseMlpPaths()) load(linear);
  }
  w.input_layernorm = base.Get(p + "input_layernorm.weight", device, at::kFloat);
  w.post_attention_layernorm = base.Get(p + "post_attention_layernorm.weight", device, at::kFloat);
  w.q_bias = optional("self_attn.q_proj.bias");
  w.k_bias = optional("self_attn.k_proj.bias");
  w.v_bias = optional("self_attn.v_proj.bias");
  w.q_norm = optional("self_attn.q_norm.weight");
  w.k_norm = optional("self_attn.k_norm.weight");
  w.pre_feedforward_layernorm = optional("pre_feedforward_layernorm.weight");
  if (s.mla) {
    if (s.mla->q_lora_rank > 0)
      w.q_a_layernorm = base.Get(p + "self_attn.q_a_layernorm.weight", device, at::kFloat);
    w.kv_a_layernorm = base.Get(p + "self_attn.kv_a_layernorm.weight", device, at::kFloat);
  }
  w.post_feedforward_layernorm = optional("post_feedforward_layernorm.weight");
  if (at::Tensor o_bias = optional("self_attn.o_proj.bias"); o_bias.defined())
    w.biases.emplace("self_attn.o_proj", std::move(o_bias));
  w.sinks = optional("self_attn.sinks");
  if (base.Has(p + "mlp.down_proj.bias") || base.Has(p + "mlp.gate_proj.bias"))
    Fail("the base model has biases on its MLP, which verification does not model");
  return w;
}

std::vector<float> ToVector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kFloat).contiguous();
  return {c.data_ptr<float>(), c.data_ptr<float>() + c.numel()};
}

VariantTopK TopK(const std::string& variant, const at::Tensor& logits, int k,
                 const tokenizer::Tokenizer* tokenizer) {
  const at::Tensor last = logits.index({logits.size(0) - 1});
  const at::Tensor probs = at::softmax(last, 0);
  const auto [values, ids] = last.topk(std::min<int64_t>(k, last.size(0)));
  VariantTopK out{variant, {}};
  for (int64_t i = 0; i < ids.size(0); ++i) {
    const int64_t id = ids[i].item<int64_t>();
    out.tokens.push_back({id, tokenizer ? tokenizer->TokenText(id) : "", values[i].item<float>(),
                          probs[id].item<float>()});
  }
  return out;
}

// Float32 noise a correct merge may differ by, relative to the largest element of the row.
constexpr double kMergeNoiseRelative = 1e-5;

int MantissaBits(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 7;
    case DType::kFloat16:
      return 10;
    case DType::kFloat32:
      return 23;
    default:
      Fail("a merged model stored as {} is not verified", TorchName(dtype));
  }
}

// `stored` (the merged file's tensor `name`, in float32) against `reference` (PEFT's merge in
// float32), tallied into `tally`. Returns the reference as the file should store it: where
// `stored` is within what rounding allows, `stored` itself (either neighbour of a value near a
// tie is right), elsewhere the reference rounded to the stored dtype. A correct merge so gives
// the merged model's logits exactly, and a wrong element keeps its distance.
at::Tensor AsStored(const at::Tensor& reference, const at::Tensor& stored, DType dtype,
                    const std::string& name, RoundingTally& tally) {
  if (!stored.sizes().equals(reference.sizes()))
    Fail("the merged model's '{}' is {}, PEFT's merge {}", name,
         ShapeToString({stored.sizes().data(), stored.sizes().size()}),
         ShapeToString({reference.sizes().data(), reference.sizes().size()}));
  const int bits = MantissaBits(dtype);
  const double smallest_normal =
      dtype == DType::kFloat16 ? std::ldexp(1.0, -14) : std::ldexp(1.0, -126);
  const at::Tensor step =
      at::exp2(at::floor(at::log2(reference.abs().clamp_min(smallest_normal))) - bits);
  const at::Tensor row_scale = reference.dim() >= 2
                                   ? reference.abs().amax(reference.dim() - 1, /*keepdim=*/true)
                                   : reference.abs().max();
  const at::Tensor allowed = step + kMergeNoiseRelative * row_scale;
  const at::Tensor distance =
      at::nan_to_num((stored - reference).abs() / allowed, std::numeric_limits<double>::infinity());
  const at::Tensor nearest = reference.to(ToTorch(dtype)).to(at::kFloat);
  // Nearest rounding means something only where the stored dtype is coarser than float32's
  // noise: a float32 file is held to the distance alone.
  if (dtype != DType::kFloat32) {
    tally.elements += static_cast<uint64_t>(stored.numel());
    tally.misrounded += static_cast<uint64_t>(stored.ne(nearest).sum().item<int64_t>());
  }
  if (stored.numel() > 0) {
    const double worst = distance.max().item<double>();
    if (tally.worst_tensor.empty() || worst > tally.worst) {
      tally.worst = worst;
      tally.worst_tensor = name;
    }
  }
  return at::where(distance <= 1, stored, nearest);
}

}  // namespace

VerificationPreview PreviewVerification(const VerifyOptions& options) {
  const convert::HfModelConfig config = convert::ReadHfConfig(options.hf_model);
  const std::optional<tokenizer::Tokenizer> tokenizer = OpenTokenizer(options.hf_model);
  return {PickDevice(options.device).str(),
          ResolvePrompts(options, tokenizer ? &*tokenizer : nullptr, config.vocab_size)};
}

VerificationReport Verify(const VerifyOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  c10::InferenceMode inference;
  const at::Device device = PickDevice(options.device);
  const convert::HfModelConfig config = convert::ReadHfConfig(options.hf_model);
  const auto families = convert::LoadModelFamilies(options.model_family_dirs);
  const convert::ModelFamily& family =
      convert::FamilyFor(families, config.architecture, config.model_type);
  const LlamaSettings settings = MakeLlamaSettings(config, family);
  const HfWeights base = HfWeights::Open(options.hf_model);
  CheckBaseShapes(base, config, settings);
  // MTP layers: the layers the base's files hold after the decoder's (the causal LM loads none of
  // them; transformers' MtpModel, a model of its own, does), when the adapter's are asked for.
  const int64_t decoder_layers = config.num_hidden_layers;
  int64_t mtp_layers = 0;
  if (options.include_mtp_layers) {
    if (!options.megatron_checkpoint)
      Fail(
          "--include-mtp-layers needs --megatron-peft-checkpoint: no forward pass runs the MTP "
          "layers, so their weights are held to the checkpoint's");
    while (base.Has(fmt::format("{}.{}.input_layernorm.weight", settings.layers_prefix,
                                decoder_layers + mtp_layers)))
      ++mtp_layers;
  }
  const PeftAdapter peft =
      PeftAdapter::Open(options.adapter, base, settings.layers_prefix, decoder_layers + mtp_layers,
                        DecoderLinearPaths(settings), settings.moe, config.model_type,
                        /*for_stock_peft=*/!options.merged_model);
  std::unique_ptr<MegatronAdapter> megatron;
  if (options.megatron_checkpoint) {
    megatron =
        MegatronAdapter::Open(*options.megatron_checkpoint, config, settings, peft.storage_dtype(),
                              {options.excluded_adapter_prefixes, options.include_mtp_layers});
    if (megatron->mtp_layers() > mtp_layers) {
      Fail(
          "the checkpoint has adapters for {} MTP layer(s) but '{}' has {} after its {} decoder "
          "layers (no model.layers.{}.input_layernorm.weight)",
          megatron->mtp_layers(), options.hf_model.string(), mtp_layers, decoder_layers,
          decoder_layers + mtp_layers);
    }
  }

  const std::optional<tokenizer::Tokenizer> tokenizer = OpenTokenizer(options.hf_model);
  VerificationReport report;
  report.base_model =
      options.base_model_name.empty() ? options.hf_model.string() : options.base_model_name;
  report.adapter_path = options.adapter.string();
  report.device = device.str();
  report.compute_dtype = "float32";
  report.top_k = options.top_k;
  report.adapter_tensors = peft.stats();

  report.prompts = ResolvePrompts(options, tokenizer ? &*tokenizer : nullptr, config.vocab_size);

  // The variants, in this order: base; peft (the adapter as stock PEFT applies it); merged (the
  // checkpoint's adapter merged in Megatron's layout); then, given a merged model, peft_as_stored
  // (peft's weights rounded to the dtypes the merged files store) and merged_model (those files).
  std::optional<HfWeights> merged_files;
  if (options.merged_model) {
    merged_files.emplace(HfWeights::Open(*options.merged_model));
    CheckBaseShapes(*merged_files, config, settings);
  }
  std::vector<std::string> names = {"base", "peft"};
  if (megatron) names.push_back("merged");
  if (merged_files) names.insert(names.end(), {"peft_as_stored", "merged_model"});
  const std::size_t variants = names.size();
  const auto variant = [&](std::string_view name) {
    return static_cast<std::size_t>(std::find(names.begin(), names.end(), name) - names.begin());
  };
  // A weight of peft_as_stored: PEFT's `reference` as the merged model's `stored` tensor `name`
  // should hold it (AsStored), each comparison tallied.
  RoundingTally rounding;
  // `file_tensor`: the tensor of the files `name` is (a slice of a fused expert parameter's).
  const auto as_stored = [&](const at::Tensor& reference, const at::Tensor& stored,
                             const std::string& name, const std::string& file_tensor) {
    return AsStored(reference, stored, merged_files->DTypeOf(file_tensor), name, rounding);
  };

  // Layers stream through the device one at a time: what must fit is the embedding and head and
  // one layer per variant, in float32.
  if (options.max_device_bytes) {
    const auto bytes_of = [&](const std::string& name) {
      uint64_t n = 4;
      for (int64_t d : base.Shape(name)) n *= static_cast<uint64_t>(d);
      return n;
    };
    uint64_t layer = 0;
    // The largest layer: a hybrid's differ by block.
    for (int64_t l = 0; l < (settings.hybrid.empty() ? 1 : decoder_layers); ++l) {
      const std::string p = fmt::format("{}.{}.", settings.layers_prefix, l);
      uint64_t bytes = 0;
      for (const std::string& linear : DecoderLinearPaths(settings)) {
        if (base.Has(p + linear + ".weight")) bytes += bytes_of(p + linear + ".weight");
      }
      for (const FusedExperts& f : settings.moe.fused) {
        if (base.Has(p + f.parameter)) bytes += bytes_of(p + f.parameter);
      }
      layer = std::max(layer, bytes);
    }
    const bool tied = !base.Has("lm_head.weight") || config.tie_word_embeddings;
    const uint64_t needed =
        bytes_of(settings.embedding) * (tied ? 1 : 2) * (merged_files ? 3 : 1) + layer * variants;
    if (needed > *options.max_device_bytes) {
      Fail(
          "verification needs {} bytes of device memory (embedding, head and one layer per variant "
          "in "
          "float32) but --verify-max-gpu-mem allows {}",
          needed, *options.max_device_bytes);
    }
  }

  // Hidden states: [variant][prompt].
  std::vector<std::vector<at::Tensor>> hidden(variants);
  {
    const std::string& name = settings.embedding;
    std::vector<at::Tensor> embed(variants, base.Get(name, device, at::kFloat));
    if (merged_files) {
      embed[variant("merged_model")] = merged_files->Get(name, device, at::kFloat);
      embed[variant("peft_as_stored")] =
          as_stored(embed[0], embed[variant("merged_model")], name, name);
    }
    for (const auto& p : report.prompts) {
      const at::Tensor ids = at::tensor(p.token_ids, at::kLong).to(device);
      for (std::size_t v = 0; v < variants; ++v)
        hidden[v].push_back(embed[v].index_select(0, ids) * settings.embedding_scale);
    }
  }
  // PEFT's weights of `layer` as the merged model's files store them; `files`: those files' layer.
  const auto as_stored_layer = [&](int64_t layer, const LayerWeights& peft_weights,
                                   LayerWeights& files) {
    std::map<std::string, at::Tensor> in_files;
    ForEachWeight(files, settings,
                  [&](const std::string& name, at::Tensor& t) { in_files.emplace(name, t); });
    LayerWeights stored = peft_weights;
    const std::string prefix = fmt::format("{}.{}.", settings.layers_prefix, layer);
    ForEachWeight(stored, settings, [&](const std::string& name, at::Tensor& t) {
      const auto file = in_files.find(name);
      if (file == in_files.end()) Fail("the merged model has no tensor '{}'", prefix + name);
      const auto sliced = files.stored_as.find(name);
      t = as_stored(t, file->second, prefix + name,
                    prefix + (sliced == files.stored_as.end() ? name : sliced->second));
    });
    return stored;
  };
  for (int64_t layer = 0; layer < decoder_layers; ++layer) {
    const LayerWeights base_weights = LoadLayer(base, layer, settings, device);
    LayerWeights peft_weights = base_weights;
    peft.Apply(layer, peft_weights, device);
    std::vector<const LayerWeights*> per_variant = {&base_weights, &peft_weights};
    LayerWeights merged_weights, stored_weights, merged_model_weights;
    if (megatron) {
      merged_weights = base_weights;
      megatron->Apply(layer, merged_weights, device);
      per_variant.push_back(&merged_weights);
    }
    if (merged_files) {
      merged_model_weights = LoadLayer(*merged_files, layer, settings, device);
      stored_weights = as_stored_layer(layer, peft_weights, merged_model_weights);
      per_variant.insert(per_variant.end(), {&stored_weights, &merged_model_weights});
    }
    for (std::size_t v = 0; v < variants; ++v) {
      for (auto& h : hidden[v]) h = DecoderLayer(h, *per_variant[v], settings, layer);
    }
    if (options.progress) {
      options.progress(
          {"verify", static_cast<uint64_t>(layer + 1), static_cast<uint64_t>(decoder_layers)});
    }
  }
  // The MTP layers run in no forward pass here (the model PEFT wraps has no MTP module): PEFT's
  // update of each weight is held to the Megatron merge's, and a merged model's files to PEFT's
  // weights.
  std::optional<UpdateComparison> mtp;
  if (options.include_mtp_layers) mtp.emplace().layers = megatron->mtp_layers();
  for (int64_t layer = decoder_layers; layer < decoder_layers + (mtp ? mtp->layers : 0); ++layer) {
    LayerWeights base_weights = LoadLayer(base, layer, settings, device);
    LayerWeights peft_weights = base_weights, merged_weights = base_weights;
    peft.Apply(layer, peft_weights, device);
    megatron->Apply(layer, merged_weights, device);
    std::map<std::string, at::Tensor> merged_by_name, base_by_name;
    ForEachWeight(merged_weights, settings,
                  [&](const std::string& name, at::Tensor& t) { merged_by_name.emplace(name, t); });
    ForEachWeight(base_weights, settings,
                  [&](const std::string& name, at::Tensor& t) { base_by_name.emplace(name, t); });
    ForEachWeight(peft_weights, settings, [&](const std::string& name, at::Tensor& t) {
      const at::Tensor& original = base_by_name.at(name);
      const at::Tensor update = merged_by_name.at(name) - original;
      const double diff = (t - original - update).abs().max().item<double>();
      mtp->scale = std::max(mtp->scale, update.abs().max().item<double>());
      if (!(diff <= mtp->max_diff)) {  // NaN is the worst
        mtp->max_diff = std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff;
        mtp->worst_tensor = fmt::format("{}.{}.{}", settings.layers_prefix, layer, name);
      }
    });
    if (merged_files) {
      LayerWeights files = LoadLayer(*merged_files, layer, settings, device);
      as_stored_layer(layer, peft_weights, files);
    }
  }

  const std::string head = base.Has("lm_head.weight") && !config.tie_word_embeddings
                               ? "lm_head.weight"
                               : settings.embedding;
  const std::string& norm = settings.final_norm;
  std::vector<at::Tensor> norms(variants, base.Get(norm, device, at::kFloat));
  std::vector<at::Tensor> heads(variants, base.Get(head, device, at::kFloat));
  if (merged_files) {
    const std::size_t files = variant("merged_model"), stored = variant("peft_as_stored");
    norms[files] = merged_files->Get(norm, device, at::kFloat);
    heads[files] = merged_files->Get(head, device, at::kFloat);
    norms[stored] = as_stored(norms[0], norms[files], norm, norm);
    // A tied head is the embedding again: tallied twice, which changes no verdict.
    heads[stored] = as_stored(heads[0], heads[files], head, head);
  }
  CheckInputs inputs;
  inputs.top_k = options.top_k;
  for (std::size_t i = 0; i < report.prompts.size(); ++i) {
    PromptLogits logits;
    for (std::size_t v = 0; v < variants; ++v) {
      const at::Tensor out =
          SoftCap(at::matmul(RmsNorm(hidden[v][i], norms[v], settings.rms_norm_eps,
                                     settings.norm_weight_offset),
                             heads[v].t()),
                  settings.final_softcap)
              .to(at::kCPU);
      logits.Of(names[v]) = out;
      report.prompts[i].logits.push_back({names[v], out.sizes().vec(), ToVector(out)});
      report.prompts[i].top_k.push_back(
          TopK(names[v], out, options.top_k, tokenizer ? &*tokenizer : nullptr));
    }
    inputs.prompts.push_back(std::move(logits));
  }
  if (merged_files) inputs.merged_model_weights = rounding;
  inputs.mtp_layers = mtp;
  inputs.unused_tensors = peft.unused_tensors().size();
  inputs.missing_tensors = peft.missing_tensors().size();
  inputs.unmodelled_fields = peft.unmodelled_fields();
  if (!peft.unused_tensors().empty()) inputs.first_unused = peft.unused_tensors().front();
  if (!peft.missing_tensors().empty()) inputs.first_missing = peft.missing_tensors().front();
  report.checks = RunChecks(inputs);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace adapter_job::verify
