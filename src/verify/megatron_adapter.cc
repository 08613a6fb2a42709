// Megatron's adapter semantics (Megatron-Bridge peft/lora_layers.py, dora_layers.py,
// canonical_lora.py): y = W x + (alpha/dim)·B·A·x on each TP rank's local rows of the fused
// projection; DoRA rescales those local rows by magnitude / row norm. MoE experts (peft/utils.py
// ParallelLinearAdapter, GroupedExpertLinearAdapter): expert e applies slice e of an [experts,
// ...] adapter, or the one adapter a shared 2-D tensor holds, with its own rank as dim
// (normalize_moe_lora makes it dim / top-k).
#include "megatron_adapter.h"

#include <map>

#include "adapter_job/checkpoint/checkpoint_resolver.h"
#include "adapter_job/core/error.h"
#include "hf_weights.h"
#include "lora_merge.h"

namespace adapter_job::verify {
namespace {

using at::indexing::Slice;
using checkpoint::AdapterParam;

// The q, k and v linears of an attention, as LayerWeights holds them.
struct QkvLinears {
  at::Tensor& q;
  at::Tensor& k;
  at::Tensor& v;
};

// linear_qkv rows: for each query group g, its q heads, then k_g, then v_g (d rows each head).
at::Tensor FuseQkv(const QkvLinears& w, int64_t groups, int64_t d) {
  const int64_t per_group = w.q.size(0) / groups;
  std::vector<at::Tensor> rows;
  for (int64_t g = 0; g < groups; ++g) {
    rows.push_back(w.q.index({Slice(g * per_group, (g + 1) * per_group)}));
    rows.push_back(w.k.index({Slice(g * d, (g + 1) * d)}));
    rows.push_back(w.v.index({Slice(g * d, (g + 1) * d)}));
  }
  return at::cat(rows, 0);
}

void SplitQkv(const at::Tensor& fused, const QkvLinears& w, int64_t groups, int64_t d) {
  const int64_t per_group = w.q.size(0) / groups;
  const int64_t stride = per_group + 2 * d;
  std::vector<at::Tensor> q, k, v;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t base = g * stride;
    q.push_back(fused.index({Slice(base, base + per_group)}));
    k.push_back(fused.index({Slice(base + per_group, base + per_group + d)}));
    v.push_back(fused.index({Slice(base + per_group + d, base + stride)}));
  }
  w.q = at::cat(q, 0);
  w.k = at::cat(k, 0);
  w.v = at::cat(v, 0);
}

// The global rows of TP rank `rank`'s local linear_fc1 output [gate_rank; up_rank].
at::Tensor LocalFc1Rows(int64_t ffn, int64_t tp, int64_t rank, const at::Device& device) {
  const int64_t slice = ffn / tp;
  return at::cat({at::arange(rank * slice, (rank + 1) * slice),
                  at::arange(ffn + rank * slice, ffn + (rank + 1) * slice)})
      .to(device);
}

}  // namespace

std::unique_ptr<MegatronAdapter> MegatronAdapter::Open(
    const std::filesystem::path& checkpoint, const convert::HfModelConfig& model,
    const LlamaSettings& settings, at::ScalarType adapter_dtype,
    const checkpoint::AdapterSelection& selection) {
  // The resolver the export used: the iteration it pinned (export --wait/--result) resolves to
  // itself, a save directory to the iteration its latest_checkpointed_iteration.txt names.
  auto run = checkpoint::OpenRunDirectory(checkpoint::ResolveCheckpoint(checkpoint).iteration_dir);
  if (!run.peft) Fail("'{}' has no run_config.yaml peft: section", run.iteration_dir.string());
  auto reader = checkpoint::CheckpointReader::Open(run.iteration_dir);
  std::unique_ptr<MegatronAdapter> adapter(new MegatronAdapter(std::move(run), std::move(reader)));
  adapter->layout_ =
      checkpoint::PlanAdapterLayout(adapter->reader_.metadata(), adapter->run_.model, selection);
  adapter->reader_.CheckDeclaredBytes(adapter->layout_);
  adapter->model_ = model;
  adapter->adapter_dtype_ = adapter_dtype;
  adapter->moe_ = settings.moe;
  adapter->hybrid_ = !settings.hybrid.empty();
  adapter->alpha_ = adapter->run_.peft->alpha.get<double>();
  adapter->scale_ = adapter->alpha_ / static_cast<double>(adapter->run_.peft->dim);
  return adapter;
}

void MegatronAdapter::Apply(int64_t layer, LayerWeights& w, const at::Device& device) const {
  const auto& layout = layout_.layers.at(static_cast<std::size_t>(layer));
  // Read every adapter tensor of the layer, assembled from all of its chunks.
  std::map<std::pair<std::string, std::string>, Adapter> adapters;
  for (std::size_t index = 0; index < layout.tensors.size(); ++index) {
    const auto& t = layout.tensors[index];
    Tensor host = Tensor::Zeros(t.dtype, t.shape);
    for (const auto& chunk : layout.chunks) {
      if (chunk.tensor_index == index) {
        reader_.ReadChunkInto(checkpoint::TensorMetaOf(reader_.metadata(), chunk),
                              checkpoint::MetaOf(reader_.metadata(), chunk), host,
                              chunk.offsets_in_layer);
      }
    }
    const at::Tensor tensor =
        at::from_blob(host.data.data(), host.shape, at::TensorOptions().dtype(ToTorch(host.dtype)))
            .to(device, adapter_dtype_, false, /*copy=*/true)
            .to(at::kFloat);
    Adapter& parts = adapters[{t.key.module, t.key.canonical}];
    (t.key.param == AdapterParam::kLinearIn    ? parts.a
     : t.key.param == AdapterParam::kLinearOut ? parts.b
                                               : parts.m) = tensor;
  }

  const int64_t d = model_.head_dim;
  const int64_t groups = model_.num_key_value_heads;
  const int64_t ffn = model_.intermediate_size;
  const int64_t tp = layout_.tensor_parallel;
  for (const auto& [key, p] : adapters) {
    const auto& [module, canonical] = key;
    const std::string what = fmt::format("layer {} {}{}{} (Megatron checkpoint)", layer, module,
                                         canonical.empty() ? "" : " ", canonical);
    if (!p.a || !p.b)
      Fail("layer {}: {} {} lacks linear_in or linear_out", layer, module, canonical);
    if (module == "mlp.experts.experts.linear_fc1" || module == "mlp.experts.experts.linear_fc2") {
      if (p.m)
        Fail("layer {}: {} has a DoRA magnitude; expert DoRA is not supported", layer, module);
      const bool fc1 = module.ends_with("linear_fc1");
      for (int64_t e = 0; e < moe_.experts; ++e) {
        const at::Tensor a = p.a->dim() == 3 ? (*p.a)[e] : *p.a;
        const at::Tensor b = p.b->dim() == 3 ? (*p.b)[e] : *p.b;
        const double scale = alpha_ / static_cast<double>(a.size(0));
        const auto linear = [&](std::size_t which) -> at::Tensor& {
          return w.Linear(convert::ExpertPath(moe_.expert[which], e));
        };
        if (fc1) {  // rows [gate; up], whatever the expert TP
          const at::Tensor merged =
              MergeAdapter(at::cat({linear(0), linear(1)}, 0), a, b, scale, std::nullopt, what);
          const int64_t f = linear(0).size(0);
          linear(0) = merged.index({Slice(0, f)});
          linear(1) = merged.index({Slice(f, 2 * f)});
        } else {
          linear(2) = MergeAdapter(linear(2), a, b, scale, std::nullopt, what);
        }
      }
    } else if (module == "mlp.router" && canonical.empty()) {
      // LoRATopKRouter: the adapter adds to the router's logits (peft/lora_layers.py).
      if (moe_.router.empty())
        Fail("layer {}: a router adapter, but the model has no router", layer);
      at::Tensor& router = w.Linear(moe_.router);
      router = MergeAdapter(router, *p.a, *p.b, scale_, p.m, what);
    } else if (hybrid_) {
      ApplyHybrid(layer, module, canonical, p, w, what);
    } else if (module == "self_attention.linear_qkv" && canonical.empty()) {
      const QkvLinears qkv{w.q_proj, w.k_proj, w.v_proj};
      SplitQkv(MergeAdapter(FuseQkv(qkv, groups, d), *p.a, *p.b, scale_, p.m, what), qkv, groups,
               d);
    } else if ((module == "mlp.linear_fc1" || module == "mlp.shared_experts.linear_fc1") &&
               canonical.empty()) {
      // Each TP rank merges its local [gate_i; up_i] rows; its magnitude slice is stored in that
      // local order, one rank after the other. DeepSeek's shared experts are such an MLP too.
      const std::string parent = module.substr(0, module.rfind('.'));
      at::Tensor& gate = w.Linear(parent + ".gate_proj");
      at::Tensor& up = w.Linear(parent + ".up_proj");
      const int64_t f = gate.size(0);
      at::Tensor fused = at::cat({gate, up}, 0);
      CheckMergeShapes(what, fused, *p.a, *p.b, p.m);
      at::Tensor merged = fused.clone();
      const int64_t local = 2 * f / tp;
      for (int64_t rank = 0; rank < tp; ++rank) {
        const at::Tensor rows = LocalFc1Rows(f, tp, rank, device);
        std::optional<at::Tensor> m;
        if (p.m) m = p.m->index({Slice(rank * local, (rank + 1) * local)});
        merged.index_put_(
            {rows}, MergeAdapter(fused.index({rows}), *p.a, p.b->index({rows}), scale_, m, what));
      }
      gate = merged.index({Slice(0, f)});
      up = merged.index({Slice(f, 2 * f)});
    } else if (module == "mlp.linear_fc1" &&
               (canonical == "adapter_gate" || canonical == "adapter_up")) {
      // Saved through the SwiGLU sharded factory: rank i's rows are stored as chunks i and i + TP
      // of 2·TP; put them back in rank order.
      const int64_t quarter = ffn / (2 * tp);
      std::vector<at::Tensor> rows;
      for (int64_t rank = 0; rank < tp; ++rank) {
        rows.push_back(p.b->index({Slice(rank * quarter, (rank + 1) * quarter)}));
        rows.push_back(p.b->index({Slice((tp + rank) * quarter, (tp + rank + 1) * quarter)}));
      }
      at::Tensor& target = canonical == "adapter_gate" ? w.gate_proj : w.up_proj;
      if (p.b->size(0) != 2 * tp * quarter) CheckMergeShapes(what, target, *p.a, *p.b, p.m);
      target = MergeAdapter(target, *p.a, at::cat(rows, 0), scale_, p.m, what);
    } else {
      static const std::map<std::pair<std::string, std::string>, std::string> kUnfused = {
          {{"self_attention.linear_proj", ""}, "self_attn.o_proj"},
          {{"mlp.linear_fc2", ""}, "mlp.down_proj"},
          {{"self_attention.linear_qkv", "adapter_q"}, "self_attn.q_proj"},
          {{"self_attention.linear_qkv", "adapter_k"}, "self_attn.k_proj"},
          {{"self_attention.linear_qkv", "adapter_v"}, "self_attn.v_proj"},
          // DeepSeek's MLA (Megatron-Bridge models/deepseek/common.py: one to one) and shared
          // experts.
          {{"self_attention.linear_q_down_proj", ""}, "self_attn.q_a_proj"},
          {{"self_attention.linear_q_up_proj", ""}, "self_attn.q_b_proj"},
          {{"self_attention.linear_q_proj", ""}, "self_attn.q_proj"},
          {{"self_attention.linear_kv_down_proj", ""}, "self_attn.kv_a_proj_with_mqa"},
          {{"self_attention.linear_kv_up_proj", ""}, "self_attn.kv_b_proj"},
          {{"mlp.shared_experts.linear_fc2", ""}, "mlp.shared_experts.down_proj"},
      };
      const auto it = kUnfused.find(key);
      if (it == kUnfused.end())
        Fail("layer {}: no Megatron semantics known for {} {}", layer, module, canonical);
      at::Tensor& target = w.Linear(it->second);
      target = MergeAdapter(target, *p.a, *p.b, scale_, p.m, what);
    }
  }
}

// Nemotron-H (Megatron-Bridge nemotron_h_bridge.py): every module one to one but linear_qkv, and
// linear_fc1 not gated. in_proj's adapter acts on each TP rank's local rows [z_r; x_r; B_r; C_r;
// dt_r] with the same rows of linear_out, whose parts the checkpoint stores each TP-split, so the
// joined lora_B is the global rows in transformers' order and each row merges as it is.
void MegatronAdapter::ApplyHybrid(int64_t layer, const std::string& module,
                                  const std::string& canonical, const Adapter& p, LayerWeights& w,
                                  const std::string& what) const {
  const int64_t d = model_.head_dim;
  const int64_t groups = model_.num_key_value_heads;
  if (module == "self_attention.linear_qkv" && canonical.empty()) {
    const QkvLinears qkv{w.Linear("mixer.q_proj"), w.Linear("mixer.k_proj"),
                         w.Linear("mixer.v_proj")};
    SplitQkv(MergeAdapter(FuseQkv(qkv, groups, d), *p.a, *p.b, scale_, p.m, what), qkv, groups, d);
    return;
  }
  static const std::map<std::pair<std::string, std::string>, std::string> kOneToOne = {
      {{"mixer.in_proj", ""}, "mixer.in_proj"},
      {{"mixer.out_proj", ""}, "mixer.out_proj"},
      {{"self_attention.linear_proj", ""}, "mixer.o_proj"},
      {{"mlp.linear_fc1", ""}, "mixer.up_proj"},
      {{"mlp.linear_fc2", ""}, "mixer.down_proj"},
  };
  const auto it = kOneToOne.find({module, canonical});
  if (it == kOneToOne.end())
    Fail("layer {}: no Megatron semantics known for {} {} in a hybrid", layer, module, canonical);
  if (module == "mixer.in_proj" && p.m)
    Fail(
        "layer {}: a DoRA magnitude on in_proj, whose TP-local rows it would scale, is not "
        "modelled",
        layer);
  at::Tensor& target = w.Linear(it->second);
  target = MergeAdapter(target, *p.a, *p.b, scale_, p.m, what);
}

}  // namespace adapter_job::verify
