// The export job: plan on every rank from the metadata alone, gather layers to rank 0, convert
// and write each layer as it arrives into a staged output directory, commit at the end.
#include "adapter_job/export.h"

#include <fmt/format.h>

#include <chrono>
#include <map>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/checkpoint_reader.h"
#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/checkpoint/run_directory.h"
#include "adapter_job/checkpoint/storage_budget.h"
#include "adapter_job/comm/layer_gather.h"
#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/convert/base_model.h"
#include "adapter_job/convert/hf_config.h"
#include "adapter_job/convert/layer_conversion.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/process_memory.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/output_guard.h"
#include "adapter_job/writer/staged_directory.h"

namespace adapter_job {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr const char* kWeightsFile = "adapter_model.safetensors";
constexpr const char* kConfigFile = "adapter_config.json";

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// When --hf-model-id is not a local directory, the dims come from run_config.yaml and the
// Megatron GPT layout maps like Llama's (as Megatron-Bridge's GPTModelProvider does).
convert::HfModelConfig ModelConfigFromRunConfig(const checkpoint::RunDirectory& run) {
  const auto& m = run.model;
  const auto need = [&](const std::optional<int64_t>& v, const char* key) {
    if (!v) {
      Fail(
          "--hf-model-id is not a local directory, and {} has no model.{} to take the model "
          "dimensions from",
          run.run_config_path ? run.run_config_path->string() : "the checkpoint", key);
    }
    return *v;
  };
  convert::HfModelConfig c;
  c.path = run.run_config_path.value_or(run.iteration_dir / "run_config.yaml");
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = need(m.hidden_size, "hidden_size");
  c.num_attention_heads = need(m.num_attention_heads, "num_attention_heads");
  c.num_key_value_heads = m.num_query_groups.value_or(c.num_attention_heads);
  c.head_dim = m.kv_channels.value_or(c.hidden_size / c.num_attention_heads);
  c.intermediate_size = need(m.ffn_hidden_size, "ffn_hidden_size");
  c.num_hidden_layers = need(m.num_layers, "num_layers");
  return c;
}

struct Plan {
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  convert::BaseModel base;
  checkpoint::RunDirectory run;
  std::optional<checkpoint::CheckpointReader> reader;
  checkpoint::AdapterLayout layout;
  std::vector<convert::ModelFamily> families;  // settings.family points into it
  convert::ConversionSettings settings;
  std::vector<std::vector<convert::OutputTensor>> outputs;  // per layer
  comm::ShardOwnership owners;
  std::optional<std::size_t> integrity_files;
  std::string integrity_not_checked;
};

// Built in place: the layout points into the reader's metadata, so a Plan never moves.
std::unique_ptr<Plan> MakePlan(const ExportOptions& options,
                               const std::vector<writer::NamedPath>& outputs, int world_size,
                               int rank) {
  auto owned = std::make_unique<Plan>();
  Plan& plan = *owned;
  // Verification asked for but impossible is an error before any work, never a quiet skip.
  plan.base = convert::ResolveBaseModel(options.hf_model_id);
  if (options.verify) convert::RequireWeightsToVerify(plan.base);
  // The digests first: a damaged file is then named as such, not as whatever parse error it causes.
  plan.run =
      checkpoint::OpenRunDirectory(options.checkpoint, [&](const checkpoint::RunDirectory& run) {
        if (!run.integrity) {
          plan.integrity_not_checked = "the checkpoint has no integrity.json";
        } else if (!options.check_integrity) {
          plan.integrity_not_checked = "--no-integrity-check";
        } else {
          checkpoint::CheckIntegrity(*run.integrity, run.iteration_dir, rank, world_size);
          plan.integrity_files = run.integrity->files.size();
        }
      });
  if (!plan.run.peft) {
    Fail(
        "no run_config.yaml with a peft: section in or above '{}': the adapter's dim, alpha and "
        "kind are unknown",
        plan.run.iteration_dir.string());
  }
  std::vector<writer::NamedPath> inputs = {
      {"--megatron-peft-checkpoint", options.checkpoint},
      {"the checkpoint's iteration directory", plan.run.iteration_dir},
      {"--hf-model-id", plan.base.dir.value_or(fs::path())}};
  for (const auto& dir : options.model_family_dirs) inputs.push_back({"--model-families", dir});
  writer::RefuseOutputsOverInputs(outputs, inputs);
  plan.reader.emplace(checkpoint::CheckpointReader::Open(plan.run.iteration_dir));
  plan.layout = checkpoint::PlanAdapterLayout(plan.reader->metadata(), plan.run.model);
  // Before any collective, and before any buffer is sized from the .metadata: a missing or short
  // shard, or a .metadata that declares more than the files hold. Every rank checks every chunk,
  // so all fail alike.
  checkpoint::CheckDeclaredBytes(plan.layout, plan.reader->metadata(), plan.run.iteration_dir);

  plan.settings.model =
      plan.base.dir ? convert::ReadHfConfig(*plan.base.dir) : ModelConfigFromRunConfig(plan.run);
  if (plan.settings.model.num_hidden_layers != plan.layout.num_layers) {
    Fail("{} says {} layers but the checkpoint has {}", plan.settings.model.path.string(),
         plan.settings.model.num_hidden_layers, plan.layout.num_layers);
  }
  plan.families = convert::LoadModelFamilies(options.model_family_dirs);
  plan.settings.family =
      WithContext([&] { return plan.settings.model.path.string(); },
                  [&] {
                    return &convert::FamilyFor(plan.families, plan.settings.model.architecture,
                                               plan.settings.model.model_type);
                  });
  plan.settings.kind = plan.run.peft->kind;
  plan.settings.training_tensor_parallel = plan.layout.tensor_parallel;
  plan.settings.dtype = options.dtype;
  for (const auto& layer : plan.layout.layers) {
    plan.outputs.push_back(convert::PlanLayerConversion(layer, plan.settings));
  }
  // Expert tensors with an expert axis were checked against the model's count above; a shared
  // adapter saved without one (before Megatron-Bridge 0.5.1) says nothing of it, so the training's
  // own count must agree with the model's, or the adapter is copied to experts that were never
  // trained.
  if (const auto experts = plan.run.model.num_moe_experts;
      experts && plan.base.dir && *experts != plan.settings.model.num_experts) {
    const int64_t model_experts = plan.settings.model.num_experts;
    Fail("{} describes {}, but {}: model.num_moe_experts is {}", plan.settings.model.path.string(),
         model_experts == 0 ? "a dense model"
                            : fmt::format("{} experts per MoE layer", model_experts),
         plan.run.run_config_path->string(), *experts);
  }
  plan.owners = comm::ShardOwnership::Assign(plan.layout.shard_count(), world_size);
  return owned;
}

std::vector<safetensors::TensorSpec> FileSpecs(const Plan& plan, bool peft_names) {
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& layer_outputs : plan.outputs) {
    for (const auto& out : layer_outputs) {
      specs.push_back(
          {peft_names ? out.name : out.name.substr(std::string("base_model.model.").size()),
           out.dtype, out.shape});
    }
  }
  return specs;
}

// One output tensor as it leaves the pipeline on rank 0: its bytes, in consecutive pieces that
// point into the layer buffer (or into `cast` when the dtype changes).
struct OutputBytes {
  std::vector<std::span<const std::byte>> pieces;
  Tensor cast;
  Tensor ToTensor(const convert::OutputTensor& out) const {
    Tensor t;
    t.dtype = out.dtype;
    t.shape = out.shape;
    for (const auto& piece : pieces) t.data.insert(t.data.end(), piece.begin(), piece.end());
    return t;
  }
};

// Runs the collective pipeline; `consume` sees every output tensor on rank 0, layer by layer.
ExportReport RunPipeline(
    const ExportOptions& options, const std::vector<writer::NamedPath>& outputs,
    const comm::MpiWorld& world, const std::function<void(Plan&)>& prepare_rank0,
    const std::function<void(const convert::OutputTensor&, const OutputBytes&)>& consume,
    const std::function<void(Plan&)>& finish_rank0) {
  const auto start = Clock::now();
  ExportReport report;
  std::unique_ptr<Plan> owned_plan;
  comm::RunAgreed(world, [&] {
    owned_plan = MakePlan(options, outputs, world.size(), world.rank());
    if (world.rank() == 0) prepare_rank0(*owned_plan);
  });
  Plan& plan = *owned_plan;
  report.seconds.plan = Since(start);
  report.integrity_files = plan.integrity_files;
  report.integrity_not_checked = plan.integrity_not_checked;

  std::unique_ptr<comm::Transport> transport;
  comm::RunAgreed(world, [&] { transport = comm::MakeTransport(world, options.backend); });

  double convert_seconds = 0;
  uint64_t layers_done = 0;
  uint64_t bytes_gathered = 0;
  comm::GatherStats stats;
  // Past this point ranks wait on each other: a failure must take every rank down (main aborts).
  try {
    stats = comm::GatherLayers(
        plan.layout, *plan.reader, plan.owners, *transport, world.rank(),
        [&](const checkpoint::LayerLayout& layer, std::span<const std::byte> buffer) {
          const auto convert_start = Clock::now();
          for (const auto& out : plan.outputs[static_cast<std::size_t>(layer.layer)]) {
            OutputBytes bytes;
            if (convert::NeedsCast(out, layer)) {
              bytes.cast = convert::MaterializeOutput(out, layer, buffer);
              bytes.pieces = {bytes.cast.data};
            } else {
              bytes.pieces = convert::OutputPieces(out, layer, buffer);
            }
            for (const auto& piece : bytes.pieces) report.tensor_bytes += piece.size();
            ++report.tensors;
            consume(out, bytes);
          }
          convert_seconds += Since(convert_start);
          bytes_gathered += buffer.size();
          if (options.progress) {
            options.progress({"export", ++layers_done,
                              static_cast<uint64_t>(plan.layout.num_layers), bytes_gathered,
                              report.tensors, report.tensor_bytes});
          }
        });
  } catch (Error& e) {
    e.MarkAbortPeers();
    throw;
  } catch (const std::exception& e) {
    Error error(fmt::format("while gathering layers: {}", e.what()));
    error.MarkAbortPeers();
    throw error;
  }

  // Collective, so gathered while every rank still takes part (rank 0 then finishes alone).
  report.bytes_read_per_rank = comm::GatherToRoot(world, plan.reader->bytes_read());
  report.expected_bytes_per_rank =
      comm::ExpectedBytesPerRank(plan.layout, plan.reader->metadata(), plan.owners, world.size());
  report.peak_rss_bytes_per_rank = comm::GatherToRoot(world, PeakResidentBytes());
  comm::RunAgreed(world, [&] {
    if (world.rank() == 0) finish_rank0(plan);
  });

  report.output = fs::absolute(options.output).lexically_normal();
  report.backend = std::string(transport->name());
  report.ranks = world.size();
  report.tensor_parallel = plan.layout.tensor_parallel;
  report.pipeline_parallel = plan.layout.pipeline_parallel;
  report.virtual_pipeline = plan.layout.virtual_pipeline;
  report.adapter_kind = std::string(checkpoint::AdapterKindName(plan.settings.kind));
  report.layers = plan.layout.num_layers;
  report.seconds.read = stats.read_seconds;
  report.seconds.communicate = stats.communicate_seconds;
  report.seconds.convert_write = convert_seconds;
  report.seconds.total = Since(start);
  // Rank 0 went on alone (finishing the output): its own peak is read again now.
  if (!report.peak_rss_bytes_per_rank.empty())
    report.peak_rss_bytes_per_rank[0] = PeakResidentBytes();
  return report;
}

// The report file, unnamed in the nearest existing ancestor of its directory until it is
// written: missing directories are created only then, like the output's, so a failed run leaves
// none behind.
OutputFile OpenReport(const fs::path& path) {
  return OutputFile::CreateUnnamed(NearestExistingDirectory(path), fs::absolute(path));
}

// Megatron's peft settings plus the rank of every adapted module (for rank_pattern).
writer::AdapterConfigInputs AdapterConfigFor(const Plan& plan, const ExportOptions& options) {
  writer::AdapterConfigInputs config;
  config.base_model_name_or_path = options.hf_model_id;
  config.r = plan.run.peft->dim;
  config.lora_alpha = plan.run.peft->alpha;
  config.lora_dropout = plan.run.peft->dropout;
  config.use_dora = plan.settings.kind == checkpoint::AdapterKind::kDoRA;
  for (const auto& layer_outputs : plan.outputs) {
    for (const auto& out : layer_outputs) {
      if (out.param == checkpoint::AdapterParam::kLinearIn) {
        config.modules.push_back({out.module, out.leaf, out.shape[0], out.rank_keys});
      }
    }
  }
  return config;
}

}  // namespace

ExportReport ExportAdapter(const ExportOptions& options, const comm::MpiWorld& world) {
  // Rank 0 only: the staged output and the weights file filled layer by layer.
  std::optional<writer::StagedDirectory> staged;
  std::optional<safetensors::StreamWriter> weights;
  std::optional<OutputFile> report_file;
  uint64_t file_bytes = 0;
  fs::path unverified_output = options.output;
  unverified_output += kUnverifiedSuffix;
  const std::vector<writer::NamedPath> outputs = {
      {"--output-hf-path", options.output},
      {"the place of an unverified adapter", unverified_output},
      {"--report", options.report_path.value_or(fs::path())}};
  ExportReport report = RunPipeline(
      options, outputs, world,
      [&](Plan& plan) {
        staged.emplace(writer::StagedDirectory::Create(
            options.output, options.overwrite, {kWeightsFile, kConfigFile}, kUnverifiedSuffix));
        // Opened now, so that an unwritable --report fails before any work is done.
        if (options.report_path) report_file.emplace(OpenReport(*options.report_path));
        weights.emplace(staged->AddFile(kWeightsFile), FileSpecs(plan, true), std::nullopt);
        file_bytes = weights->file_size();
      },
      [&](const convert::OutputTensor& out, const OutputBytes& bytes) {
        weights->Write(out.name, bytes.pieces);
      },
      [&](Plan& plan) {
        weights->Finish();
        staged->AddFile(kConfigFile)
            .Write(
                writer::ToPythonJson(writer::BuildAdapterConfig(AdapterConfigFor(plan, options))));
        staged->Stage();
      });
  if (world.rank() != 0) return report;

  // Verify the files as written, before anyone can see them.
  report.published = staged->target();
  if (options.verify) {
    const auto verify_start = Clock::now();
    verify::VerifyOptions v = *options.verify;
    v.hf_model = options.hf_model_id;
    v.base_model_name = options.hf_model_id;
    v.adapter = staged->Stage();
    v.megatron_checkpoint = options.checkpoint;
    if (!v.progress) v.progress = options.progress;
    v.model_family_dirs = options.model_family_dirs;
    report.verification = verify::VerifyWithPlugin(v);
    report.verification->adapter_path = staged->target().string();
    report.seconds.verify = Since(verify_start);
  } else {
    report.verification_skipped = "--no-verify was given";
  }
  const bool rejected = report.verification && !report.verification->passed();
  if (rejected) report.published += kUnverifiedSuffix;
  report.seconds.total += report.seconds.verify;
  report.file_bytes = file_bytes;

  // The report goes first: an adapter is never published without the report that was asked for.
  if (report_file) {
    report_file->Write(report.ToJson().dump(2) + "\n");
    const fs::path parent = fs::absolute(*options.report_path).parent_path();
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) Fail<IoError>("cannot create '{}': {}", parent.string(), ec.message());
    std::move(*report_file).CommitAs(*options.report_path, /*overwrite=*/true);
  }
  try {
    if (rejected) {
      staged->Reject();
    } else {
      staged->Publish();
    }
  } catch (...) {
    if (options.report_path) {
      std::error_code ignored;
      fs::remove(*options.report_path, ignored);  // it describes an output that is not there
    }
    throw;
  }
  return report;
}

ExportReport StreamAdapterWeights(
    const ExportOptions& options, const std::vector<writer::NamedPath>& outputs,
    const comm::MpiWorld& world,
    const std::function<void(const std::vector<StreamedTensorInfo>&)>& announce,
    const std::function<void(const NamedTensor&)>& sink) {
  return RunPipeline(
      options, outputs, world,
      [&](Plan& plan) {
        std::vector<StreamedTensorInfo> infos;
        for (auto& spec : FileSpecs(plan, /*peft_names=*/false)) {
          infos.push_back({std::move(spec.name), spec.dtype, std::move(spec.shape)});
        }
        announce(infos);
      },
      [&](const convert::OutputTensor& out, const OutputBytes& bytes) {
        sink(NamedTensor{out.name.substr(std::string("base_model.model.").size()),
                         bytes.ToTensor(out)});
      },
      [](Plan&) {});
}

void SaveHfAdapter(const std::vector<NamedTensor>& tensors,
                   const writer::AdapterConfigInputs& config, const fs::path& output,
                   bool overwrite) {
  writer::StagedDirectory staged = writer::StagedDirectory::Create(
      output, overwrite, {kWeightsFile, kConfigFile}, kUnverifiedSuffix);
  std::vector<safetensors::TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back({t.name, t.tensor.dtype, t.tensor.shape});
  safetensors::StreamWriter weights(staged.AddFile(kWeightsFile), std::move(specs), std::nullopt);
  for (const auto& t : tensors) weights.Write(t.name, t.tensor.data);
  weights.Finish();
  staged.AddFile(kConfigFile).Write(writer::ToPythonJson(writer::BuildAdapterConfig(config)));
  staged.Publish();
}

nlohmann::ordered_json ExportReport::ToJson() const {
  nlohmann::ordered_json j;
  j["output"] = output.string();
  j["backend"] = backend;
  j["ranks"] = ranks;
  j["tensor_model_parallel_size"] = tensor_parallel;
  j["pipeline_model_parallel_size"] = pipeline_parallel;
  j["virtual_pipeline_model_parallel_size"] = virtual_pipeline;
  j["adapter"] = adapter_kind;
  j["layers"] = layers;
  j["tensors"] = tensors;
  j["tensor_bytes"] = tensor_bytes;
  j["file_bytes"] = file_bytes;
  j["bytes_read_per_rank"] = bytes_read_per_rank;
  j["expected_bytes_per_rank"] = expected_bytes_per_rank;
  j["peak_rss_bytes_per_rank"] = peak_rss_bytes_per_rank;
  j["seconds"] = {{"plan", seconds.plan},
                  {"read", seconds.read},
                  {"communicate", seconds.communicate},
                  {"convert_write", seconds.convert_write},
                  {"verify", seconds.verify},
                  {"total", seconds.total}};
  j["published"] = published.string();
  j["verified"] = verified();
  if (verification_skipped) j["verification_skipped"] = *verification_skipped;
  if (integrity_files) {
    j["integrity"] = {{"checked", true}, {"files", *integrity_files}};
  } else {
    j["integrity"] = {{"checked", false}, {"why", integrity_not_checked}};
  }
  if (verification) j["verification"] = verification->ToJson();
  return j;
}

std::string ExportReport::Summary() const {
  std::string read;
  for (std::size_t r = 0; r < bytes_read_per_rank.size(); ++r) {
    read += fmt::format("{}{}: {}", r ? ", " : "", r, bytes_read_per_rank[r]);
  }
  return fmt::format(
      "exported {} adapter: {} layers, {} tensors, {} bytes -> {}\n"
      "ranks {} ({} backend) over TP {} x PP {}{}; bytes read per rank: {}\n"
      "seconds: plan {:.3f}, read {:.3f}, communicate {:.3f}, convert+write {:.3f}, total {:.3f}\n",
      adapter_kind, layers, tensors, tensor_bytes, output.string(), ranks, backend, tensor_parallel,
      pipeline_parallel, virtual_pipeline > 1 ? fmt::format(" (VPP {})", virtual_pipeline) : "",
      read, seconds.plan, seconds.read, seconds.communicate, seconds.convert_write, seconds.total);
}

}  // namespace adapter_job
