// `adapter_job inspect CKPT`: what a checkpoint holds, read from its metadata alone.
#include <fmt/format.h>

#include <boost/program_options.hpp>
#include <iostream>
#include <nlohmann/json.hpp>

#include "adapter_job/checkpoint/dcp_metadata.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/core/human_bytes.h"
#include "adapter_job/core/tensor.h"
#include "commands.h"

namespace adapter_job::cli {
namespace {

using checkpoint::DcpMetadata;
using checkpoint::RunDirectory;
using Json = nlohmann::ordered_json;

uint64_t StoredBytes(const DcpMetadata& meta, const checkpoint::TensorMeta& tensor) {
  uint64_t total = 0;
  for (const auto& chunk : tensor.chunks) total += meta.Locate(tensor, chunk).length;
  return total;
}

Json LocationJson(const checkpoint::StorageLocation& location) {
  Json j = {
      {"file", location.relative_path}, {"offset", location.offset}, {"length", location.length}};
  if (!location.transform_descriptors.empty())
    j["transform_descriptors"] = location.transform_descriptors;
  return j;
}

template <typename T>
Json OptionalJson(const std::optional<T>& value) {
  return value ? Json(*value) : Json(nullptr);
}

Json PeftJson(const std::optional<checkpoint::PeftSettings>& peft) {
  if (!peft) return nullptr;
  return {{"target", peft->target},
          {"kind", checkpoint::AdapterKindName(peft->kind)},
          {"dim", peft->dim},
          {"alpha", peft->alpha},
          {"dropout", peft->dropout},
          {"dropout_position", peft->dropout_position},
          {"target_modules", peft->target_modules},
          {"exclude_modules", peft->exclude_modules},
          {"share_expert_adapters", peft->share_expert_adapters},
          {"normalize_moe_lora", peft->normalize_moe_lora}};
}

Json ModelJson(const checkpoint::ModelSettings& m) {
  return {{"tensor_model_parallel_size", m.tensor_parallel},
          {"pipeline_model_parallel_size", m.pipeline_parallel},
          {"virtual_pipeline_model_parallel_size", OptionalJson(m.virtual_pipeline_parallel)},
          {"expert_model_parallel_size", m.expert_parallel},
          {"expert_tensor_parallel_size", m.expert_tensor_parallel},
          {"num_layers", OptionalJson(m.num_layers)},
          {"hidden_size", OptionalJson(m.hidden_size)},
          {"ffn_hidden_size", OptionalJson(m.ffn_hidden_size)},
          {"num_attention_heads", OptionalJson(m.num_attention_heads)},
          {"num_query_groups", OptionalJson(m.num_query_groups)},
          {"kv_channels", OptionalJson(m.kv_channels)},
          {"hf_model_id", OptionalJson(m.hf_model_id)},
          {"params_dtype", OptionalJson(m.params_dtype)}};
}

Json InspectJson(const RunDirectory& run, const DcpMetadata& meta) {
  Json tensors = Json::array();
  for (const auto& t : meta.tensors) {
    Json chunks = Json::array();
    for (const auto& c : t.chunks) {
      Json chunk = {{"offsets", c.offsets}, {"sizes", c.sizes}};
      chunk["storage"] = LocationJson(meta.Locate(t, c));
      chunks.push_back(std::move(chunk));
    }
    tensors.push_back({{"key", t.fqn},
                       {"dtype", TorchName(t.dtype)},
                       {"shape", t.size},
                       {"bytes", t.nbytes()},
                       {"stored_bytes", StoredBytes(meta, t)},
                       {"chunks", std::move(chunks)}});
  }
  Json bytes_items = Json::array();
  for (const auto& key : meta.byte_items) {
    bytes_items.push_back({{"key", key}, {"storage", LocationJson(meta.bytes_storage.at(key))}});
  }
  return {
      {"checkpoint",
       {{"path", run.given.string()},
        {"iteration_dir", run.iteration_dir.string()},
        {"iteration", OptionalJson(run.iteration)},
        {"run_config", run.run_config_path ? Json(run.run_config_path->string()) : Json(nullptr)},
        {"metadata_version", OptionalJson(meta.version)},
        {"integrity_manifest", run.integrity.has_value()}}},
      {"peft", PeftJson(run.peft)},
      {"model", ModelJson(run.model)},
      {"tensors", std::move(tensors)},
      {"bytes_items", std::move(bytes_items)}};
}

void PrintTable(const RunDirectory& run, const DcpMetadata& meta, std::ostream& out) {
  out << "checkpoint  " << run.iteration_dir.string();
  if (run.iteration) out << "  (iteration " << *run.iteration << ")";
  out << "\n";
  if (run.peft) {
    const auto& p = *run.peft;
    std::string targets;
    for (const auto& t : p.target_modules) targets += (targets.empty() ? "" : ", ") + t;
    out << fmt::format("peft        {} ({}) dim {} alpha {} dropout {} targets [{}]\n",
                       checkpoint::AdapterKindName(p.kind), p.target, p.dim, p.alpha.dump(),
                       p.dropout.dump(), targets);
  } else {
    out << "peft        no run_config.yaml peft section found\n";
  }
  const auto& m = run.model;
  const auto opt = [](const std::optional<int64_t>& v) { return v ? std::to_string(*v) : "?"; };
  out << fmt::format(
      "model       TP {} PP {}{} EP {} ETP {}; layers {} hidden {} ffn {} heads {} groups {} "
      "kv_channels {}\n",
      m.tensor_parallel, m.pipeline_parallel,
      m.virtual_pipeline_parallel ? " VPP " + std::to_string(*m.virtual_pipeline_parallel) : "",
      m.expert_parallel, m.expert_tensor_parallel, opt(m.num_layers), opt(m.hidden_size),
      opt(m.ffn_hidden_size), opt(m.num_attention_heads), opt(m.num_query_groups),
      opt(m.kv_channels));

  std::size_t key_width = 3;
  for (const auto& t : meta.tensors) key_width = std::max(key_width, t.fqn.size());
  uint64_t total = 0;
  out << fmt::format("\n{:<{}}  {:<9}  {:<16}  {:>6}  {:>10}\n", "KEY", key_width, "DTYPE", "SHAPE",
                     "CHUNKS", "BYTES");
  for (const auto& t : meta.tensors) {
    out << fmt::format("{:<{}}  {:<9}  {:<16}  {:>6}  {:>10}\n", t.fqn, key_width,
                       TorchName(t.dtype), ShapeToString(t.size), t.chunks.size(), t.nbytes());
    total += t.nbytes();
  }
  out << fmt::format("{} tensors, {} ({} bytes)\n", meta.tensors.size(), HumanBytes(total), total);
  if (!meta.byte_items.empty()) {
    out << fmt::format("{} non-tensor items (skipped by the export):", meta.byte_items.size());
    for (std::size_t i = 0; i < meta.byte_items.size(); ++i) {
      out << (i < 6 ? " " + meta.byte_items[i] : i == 6 ? " ..." : "");
    }
    out << "\n";
  }
}

}  // namespace

int RunInspect(const std::vector<std::string>& args) {
  namespace po = boost::program_options;
  po::options_description options("adapter_job inspect CKPT [options]");
  options.add_options()("help,h", "show this help")("json", "print JSON instead of a table")(
      "checkpoint", po::value<std::string>(), "top-level run directory or iter_* directory");
  po::positional_options_description positional;
  positional.add("checkpoint", 1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(options).positional(positional).run(), vm);
  if (vm.count("help")) {
    std::cout << options;
    return 0;
  }
  if (!vm.count("checkpoint"))
    throw po::error("missing the checkpoint path (adapter_job inspect CKPT)");
  const RunDirectory run = checkpoint::OpenRunDirectory(vm["checkpoint"].as<std::string>());
  const DcpMetadata meta = checkpoint::ReadDcpMetadata(run.iteration_dir / ".metadata");
  if (vm.count("json")) {
    std::cout << InspectJson(run, meta).dump(2) << "\n";
  } else {
    PrintTable(run, meta, std::cout);
  }
  return 0;
}

}  // namespace adapter_job::cli
