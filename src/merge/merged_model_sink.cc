#include "adapter_job/merge/merged_model_sink.h"

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "adapter_job/comm/accelerator.h"
#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/json_file.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/safetensors/model_weights.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/adapter_config.h"
#include "adapter_job/writer/peft_directory_sink.h"
#include "adapter_job/writer/staged_directory.h"
#include "device_merge.h"
#include "peft_file.h"
#include "rank_share.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;

constexpr const char* kConfigFile = "config.json";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// What save_pretrained and the tokenizer's save_pretrained write beside the weights; copied as
// they are.
bool IsCopiedFile(const std::string& name) {
  static const std::set<std::string> kExact = {"generation_config.json",
                                               "tokenizer.json",
                                               "tokenizer_config.json",
                                               "special_tokens_map.json",
                                               "added_tokens.json",
                                               "tokenizer.model",
                                               "vocab.json",
                                               "vocab.txt",
                                               "merges.txt",
                                               "chat_template.json",
                                               "chat_template.jinja"};
  return kExact.count(name) > 0;
}

// model.safetensors or model-00001-of-00004.safetensors, as save_pretrained names weights files.
bool IsShardFileName(const std::string& name) {
  if (name == "model.safetensors") return true;
  static constexpr std::string_view kPattern = "model-DDDDD-of-DDDDD.safetensors";
  if (name.size() != kPattern.size()) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    const bool digit = kPattern[i] == 'D';
    if (digit ? !std::isdigit(static_cast<unsigned char>(name[i])) : name[i] != kPattern[i])
      return false;
  }
  return true;
}

std::vector<std::string> CopiedFiles(const fs::path& base_model) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(base_model)) {
    const std::string name = entry.path().filename().string();
    if (IsCopiedFile(name) && entry.is_regular_file()) names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

// The base's config.json, byte for byte unless --dtype changes the dtype it records.
std::string MergedConfig(const fs::path& base_model, const std::optional<DType>& dtype) {
  const fs::path path = base_model / kConfigFile;
  std::string text = ReadTextFile(path);
  if (!dtype) return text;
  auto config = WithContext([&] { return path.string(); },
                            [&] { return ParseJson<nlohmann::ordered_json>(text); });
  // transformers 5 writes "dtype"; 4.x wrote "torch_dtype", which 5 still reads.
  const char* key =
      config.contains("torch_dtype") && !config.contains("dtype") ? "torch_dtype" : "dtype";
  config[key] = std::string(TorchName(*dtype));
  return config.dump(2) + "\n";
}

// This rank's GPU for the merge, -1 for the CPU, or why --merge-device cuda cannot be had.
std::pair<int, std::string> ChooseMergeGpu(MergeDevice device, const comm::MpiWorld& world,
                                           int local_rank) {
  if (device == MergeDevice::kCpu) return {-1, ""};
  const comm::AcceleratorInfo info =
      DeviceMergeBuilt() ? comm::ProbeAccelerators() : comm::AcceleratorInfo{};
  if (info.device_count > 0) return {local_rank % info.device_count, ""};
  if (device == MergeDevice::kAuto) return {-1, ""};
  return {-1, DeviceMergeBuilt()
                  ? fmt::format("--merge-device cuda: rank {} on {} sees no GPU ({})", world.rank(),
                                world.host(), info.unavailable_reason)
                  : "--merge-device cuda: this adapter_job was built without the CUDA toolkit"};
}

}  // namespace

MergeDevice ParseMergeDevice(std::string_view name) {
  if (name == "auto") return MergeDevice::kAuto;
  if (name == "cpu") return MergeDevice::kCpu;
  if (name == "cuda") return MergeDevice::kCuda;
  Fail("--merge-device must be auto, cpu or cuda, not '{}'", name);
}

struct MergedModelSink::Open {
  writer::PeftDirectorySink adapter;
  std::optional<writer::StagedDirectory> output;
  fs::path staging;
  fs::path adapter_dir;
  uint64_t file_bytes = 0;
};

MergedModelSink::MergedModelSink(MergeOptions options, const comm::MpiWorld& world)
    : options_(std::move(options)), world_(world) {
  const comm::HostPlacement here = comm::PlaceOnHost(world);
  if (options_.threads <= 0) {
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    options_.threads = std::max(1, cores / std::max(1, here.local_size));
  }
  std::string problem;
  std::tie(gpu_, problem) = ChooseMergeGpu(options_.device, world, here.local_rank);
  // Every rank fails alike, before any work, when one cannot have what was asked.
  problem = comm::FirstNonEmpty(world, problem);
  if (!problem.empty()) throw FormatError(problem);
}

MergedModelSink::~MergedModelSink() { Abort(); }

std::vector<writer::NamedPath> MergedModelSink::Outputs() const {
  fs::path rejected = options_.target;
  rejected += writer::kUnverifiedSuffix;
  return {{"--output-hf-path", options_.target}, {"--output-hf-path (rejected)", rejected}};
}

namespace {

// The base directory the export resolved (through the HF cache, or from run_config.yaml when
// --hf-model-id was not given).
fs::path BaseModelDir(const MergeOptions& options, const writer::ExportAnnouncement& announcement) {
  const fs::path dir = announcement.base_model_dir.value_or(options.base_model);
  if (dir.empty())
    Fail("adapter_job merge needs the base model's local directory, and '{}' is none",
         announcement.config.base_model_name_or_path);
  return dir;
}

// The adapter the merge goes through, staged beside the target and never published (so not
// hashed for the report).
writer::PeftDirectorySink ScratchAdapter(const fs::path& target) {
  return writer::PeftDirectorySink(
      target.parent_path() / ("." + target.filename().string() + ".merge-adapter"),
      /*overwrite=*/false, /*digest_weights=*/false);
}

// The scratch adapter feeds the merge and the verifier, never stock PEFT: a module PEFT refuses
// to load an adapter on (Nemotron-H's out_proj) is merged like any other.
writer::ExportAnnouncement ScratchAnnouncement(const writer::ExportAnnouncement& announcement) {
  writer::ExportAnnouncement scratch = announcement;
  scratch.peft_refused.clear();
  return scratch;
}

// The merged output, laid out from the base's headers and the adapted modules alone.
struct PlannedOutput {
  fs::path target;  // absolute
  MergedLayout layout;
  std::vector<std::string> copied;  // the base's files copied as they are
  std::set<std::string> owned;      // the names an earlier output of ours may hold
};

PlannedOutput PlanOutput(const MergeOptions& options, const fs::path& base_dir,
                         const safetensors::ModelWeights& base,
                         const writer::ExportAnnouncement& announcement, int world_size) {
  PlannedOutput planned;
  planned.target = fs::absolute(options.target).lexically_normal();
  std::vector<std::string> modules;
  for (const auto& t : announcement.tensors) {
    if (modules.empty() || modules.back() != t.module) modules.push_back(t.module);
  }
  std::sort(modules.begin(), modules.end());
  modules.erase(std::unique(modules.begin(), modules.end()), modules.end());
  planned.layout =
      PlanMergedLayout(base, modules, options.dtype, options.max_shard_bytes, world_size);
  planned.copied = CopiedFiles(base_dir);
  planned.owned = {planned.copied.begin(), planned.copied.end()};
  planned.owned.insert(kConfigFile);
  planned.owned.insert(kIndexFile);
  for (const auto& shard : planned.layout.shards) planned.owned.insert(shard.file);
  // An earlier merge split into another number of shards is ours to replace too.
  for (const fs::path& earlier :
       {planned.target, fs::path(planned.target.string() + writer::kUnverifiedSuffix)}) {
    std::error_code ec;
    for (fs::directory_iterator it(earlier, ec), end; !ec && it != end; it.increment(ec)) {
      const std::string name = it->path().filename().string();
      if (IsShardFileName(name)) planned.owned.insert(name);
    }
  }
  return planned;
}

// "rank 2" or "ranks 0-3": who writes a shard's tensors.
std::string WritersOf(const MergedLayout& layout, std::size_t shard) {
  int first = -1, last = -1;
  for (const auto& t : layout.tensors) {
    if (t.shard != shard) continue;
    first = first < 0 ? t.rank : std::min(first, t.rank);
    last = std::max(last, t.rank);
  }
  return first == last ? fmt::format("rank {}", first) : fmt::format("ranks {}-{}", first, last);
}

}  // namespace

writer::SinkPreview MergedModelSink::Preview(const writer::ExportAnnouncement& announcement) const {
  const fs::path base_dir = BaseModelDir(options_, announcement);
  const safetensors::ModelWeights base = safetensors::ModelWeights::Open(base_dir);
  const PlannedOutput planned = PlanOutput(options_, base_dir, base, announcement, world_.size());
  ScratchAdapter(planned.target).Preview(ScratchAnnouncement(announcement));
  writer::SinkPreview preview;
  preview.merged_model = true;
  if (writer::StagedDirectory::CheckTarget(planned.target, options_.overwrite, planned.owned,
                                           writer::kUnverifiedSuffix))
    preview.notes.push_back(
        fmt::format("--overwrite: the existing '{}' would be replaced", planned.target.string()));
  preview.files.push_back({planned.target / kConfigFile,
                           MergedConfig(base_dir, options_.dtype).size(), "model config"});
  for (const std::string& name : planned.copied)
    preview.files.push_back(
        {planned.target / name, fs::file_size(base_dir / name), "copied from the base model"});
  if (planned.layout.shards.size() > 1) {
    preview.files.push_back({planned.target / kIndexFile,
                             writer::ToPythonJson(IndexJson(planned.layout)).size() + 1,
                             "weights index"});
  }
  for (std::size_t i = 0; i < planned.layout.shards.size(); ++i) {
    const OutputShard& shard = planned.layout.shards[i];
    preview.files.push_back({planned.target / shard.file, shard.size,
                             "merged weights, written by " + WritersOf(planned.layout, i)});
  }
  preview.notes.push_back(
      fmt::format("rank 0 merges on {} (each rank on its own: --merge-device {})",
                  gpu_ < 0 ? std::string("the CPU") : fmt::format("GPU {}", gpu_),
                  options_.device == MergeDevice::kCpu    ? "cpu"
                  : options_.device == MergeDevice::kCuda ? "cuda"
                                                          : "auto"));
  return preview;
}

void MergedModelSink::Begin(const writer::ExportAnnouncement& announcement) {
  options_.base_model = BaseModelDir(options_, announcement);
  const fs::path target = fs::absolute(options_.target).lexically_normal();
  open_.reset(new Open{ScratchAdapter(target), {}, {}, {}, 0});
  open_->adapter.Begin(ScratchAnnouncement(announcement));

  // Everything about the output is known now, so the output is laid out before the export
  // starts: a target that may not be replaced, or a base that does not fit the adapter, fails
  // before any work.
  const safetensors::ModelWeights base = safetensors::ModelWeights::Open(options_.base_model);
  const PlannedOutput planned =
      PlanOutput(options_, options_.base_model, base, announcement, world_.size());
  const MergedLayout& layout = planned.layout;
  open_->output.emplace(writer::StagedDirectory::Create(target, options_.overwrite, planned.owned,
                                                        writer::kUnverifiedSuffix));
  writer::StagedDirectory& output = *open_->output;
  const auto add = [&](const std::string& name, const std::string& text) {
    output.AddFile(name).Write(text);
    open_->file_bytes += text.size();
  };
  add(kConfigFile, MergedConfig(options_.base_model, options_.dtype));
  for (const std::string& name : planned.copied)
    add(name, ReadTextFile(options_.base_model / name, 1ull << 30));
  if (layout.shards.size() > 1) add(kIndexFile, writer::ToPythonJson(IndexJson(layout)) + "\n");
  open_->staging = output.Stage();

  // The shard files, their headers written and sized: each rank fills its tensors' places.
  for (const OutputShard& shard : layout.shards) {
    const fs::path path = open_->staging / shard.file;
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd.valid()) Fail<IoError>("cannot create '{}': {}", path.string(), std::strerror(errno));
    WriteAllAt(fd.get(), 0, std::as_bytes(std::span(shard.header)), path);
    if (::ftruncate(fd.get(), static_cast<off_t>(shard.size)) != 0)
      Fail<IoError>("cannot size '{}' to {} bytes: {}", path.string(), shard.size,
                    std::strerror(errno));
    fd.Close(path);
    open_->file_bytes += shard.size;
  }
}

void MergedModelSink::Write(const writer::LayerTensors& layer) { open_->adapter.Write(layer); }

writer::FinishedOutput MergedModelSink::Finish() {
  const bool rank0 = world_.rank() == 0;
  writer::FinishedOutput finished;
  comm::RunAgreed(world_, [&] {
    if (!rank0) return;
    finished = open_->adapter.Finish();
    open_->adapter_dir = finished.verifiable_directory;
  });
  const std::string shared = comm::FirstNonEmpty(
      world_, rank0 ? open_->staging.string() + '\0' + open_->adapter_dir.string() : "");
  const fs::path staging = shared.substr(0, shared.find('\0'));
  const fs::path adapter_dir = shared.substr(shared.find('\0') + 1);

  comm::RunAgreed(world_, [&] {
    if (!fs::is_directory(staging))
      Fail(
          "rank {} cannot see the staging directory '{}': --output-hf-path must be on a file "
          "system every rank sees",
          world_.rank(), staging.string());
    const safetensors::ModelWeights base = safetensors::ModelWeights::Open(options_.base_model);
    const PeftFile adapter = PeftFile::Open(adapter_dir, base);
    const MergedLayout layout = PlanMergedLayout(base, adapter.Modules(), options_.dtype,
                                                 options_.max_shard_bytes, world_.size());
    stats_ = WriteShare({layout, base, adapter, staging, world_.rank(), options_.threads, gpu_,
                         rank0 ? options_.progress : ProgressSink()});
  });
  if (!rank0) return {};
  finished.file_bytes = open_->file_bytes;
  finished.accepted_path = open_->output->target();
  finished.rejected_path = open_->output->target();
  finished.rejected_path += writer::kUnverifiedSuffix;
  // Verified: the adapter against the Megatron weights, and these files against the adapter.
  finished.merged_model_directory = open_->staging;
  return finished;
}

void MergedModelSink::Publish(bool accepted) {
  if (accepted) {
    open_->output->Publish();
  } else {
    open_->output->Reject();
  }
  open_->adapter.Abort();  // the adapter was the merge's input, not an output
}

void MergedModelSink::Abort() noexcept {
  if (!open_) return;
  open_->adapter.Abort();
  open_.reset();
}

}  // namespace adapter_job::merge
