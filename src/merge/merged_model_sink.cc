#include "adapter_job/merge/merged_model_sink.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/merge/base_weights.h"
#include "adapter_job/merge/merge_math.h"
#include "adapter_job/merge/merged_layout.h"
#include "adapter_job/safetensors/safetensors.h"
#include "adapter_job/writer/adapter_config.h"
#include "adapter_job/writer/peft_directory_sink.h"
#include "adapter_job/writer/staged_directory.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

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
  nlohmann::ordered_json config;
  try {
    config = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    Fail("'{}' is not valid JSON: {}", path.string(), e.what());
  }
  // transformers 5 writes "dtype"; 4.x wrote "torch_dtype", which 5 still reads.
  const char* key =
      config.contains("torch_dtype") && !config.contains("dtype") ? "torch_dtype" : "dtype";
  config[key] = std::string(TorchName(*dtype));
  return config.dump(2) + "\n";
}

void WriteAllAt(int fd, uint64_t offset, std::span<const std::byte> bytes, const fs::path& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::pwrite(fd, bytes.data(), bytes.size(), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) Fail<IoError>("cannot write '{}': {}", path.string(), std::strerror(errno));
    bytes = bytes.subspan(n);
    offset += n;
  }
}

// One module's adapter tensors in the PEFT file.
struct ModuleAdapter {
  const safetensors::TensorEntry* a = nullptr;
  const safetensors::TensorEntry* b = nullptr;
  const safetensors::TensorEntry* magnitude = nullptr;
};

std::map<std::string, ModuleAdapter> AdapterModules(const safetensors::File& adapter) {
  std::map<std::string, ModuleAdapter> modules;
  for (const auto& entry : adapter.header().tensors) {
    std::string_view name = entry.name;
    if (!name.starts_with(writer::kPeftNamePrefix))
      Fail("'{}': tensor '{}' lacks PEFT's '{}' prefix", adapter.path().string(), name,
           writer::kPeftNamePrefix);
    name.remove_prefix(writer::kPeftNamePrefix.size());
    const auto take = [&](std::string_view suffix,
                          const safetensors::TensorEntry* ModuleAdapter::*slot) {
      if (!name.ends_with(suffix)) return false;
      modules[std::string(name.substr(0, name.size() - suffix.size()))].*slot = &entry;
      return true;
    };
    if (!take(".lora_A.weight", &ModuleAdapter::a) && !take(".lora_B.weight", &ModuleAdapter::b) &&
        !take(".lora_magnitude_vector", &ModuleAdapter::magnitude))
      Fail("'{}': tensor '{}' is not a LoRA or DoRA weight this merge knows",
           adapter.path().string(), entry.name);
  }
  return modules;
}

LowRankUpdate LoadUpdate(const safetensors::File& adapter, const std::string& module,
                         const ModuleAdapter& parts, double alpha, const OutputTensor& target) {
  const auto where = [&] {
    return fmt::format("'{}', module '{}'", adapter.path().string(), module);
  };
  if (!parts.a || !parts.b) Fail("{}: lora_A or lora_B is missing", where());
  if (parts.a->shape.size() != 2 || parts.b->shape.size() != 2 || target.shape.size() != 2)
    Fail("{}: lora_A, lora_B and the base weight must be matrices", where());
  const int64_t rank = parts.a->shape[0];
  const int64_t out = target.shape[0], in = target.shape[1];
  if (parts.a->shape[1] != in || parts.b->shape[0] != out || parts.b->shape[1] != rank)
    Fail(
        "{}: lora_A is {} and lora_B {}, which do not fit the base weight '{}' of {} (expected "
        "lora_A [r, {}] and lora_B [{}, r])",
        where(), ShapeToString(parts.a->shape), ShapeToString(parts.b->shape), target.name,
        ShapeToString(target.shape), in, out);
  LowRankUpdate update;
  update.rank = rank;
  update.scale = alpha / static_cast<double>(rank);
  update.a = ToFloat32(adapter.Data(*parts.a), parts.a->dtype);
  update.b = ToFloat32(adapter.Data(*parts.b), parts.b->dtype);
  if (parts.magnitude) {
    if (parts.magnitude->shape != std::vector<int64_t>{out})
      Fail("{}: the DoRA magnitude is {}, expected [{}]", where(),
           ShapeToString(parts.magnitude->shape), out);
    update.magnitude = ToFloat32(adapter.Data(*parts.magnitude), parts.magnitude->dtype);
  }
  return update;
}

// lora_alpha from the adapter's config, refusing what this merge does not model.
double AdapterAlpha(const fs::path& adapter_dir) {
  const fs::path path = adapter_dir / writer::kAdapterConfigFile;
  const auto config = nlohmann::json::parse(ReadTextFile(path));
  const auto& alpha = config.at("lora_alpha");
  if (!alpha.is_number())
    Fail("'{}': lora_alpha is {}, expected a number", path.string(), alpha.dump());
  if (config.value("use_rslora", false)) Fail("'{}': use_rslora is not merged", path.string());
  if (config.contains("alpha_pattern") && !config["alpha_pattern"].empty())
    Fail("'{}': alpha_pattern is not merged", path.string());
  return alpha.get<double>();
}

}  // namespace

struct MergedModelSink::Open {
  writer::PeftDirectorySink adapter;
  std::optional<writer::StagedDirectory> output;
  fs::path staging;
  fs::path adapter_dir;
  uint64_t file_bytes = 0;
};

MergedModelSink::MergedModelSink(MergeOptions options, const comm::MpiWorld& world)
    : options_(std::move(options)), world_(world) {
  if (options_.threads <= 0) {
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    options_.threads = std::max(1, cores / std::max(1, comm::PlaceOnHost(world).local_size));
  }
}

MergedModelSink::~MergedModelSink() { Abort(); }

std::vector<writer::NamedPath> MergedModelSink::Outputs() const {
  fs::path rejected = options_.target;
  rejected += writer::kUnverifiedSuffix;
  return {{"--output-hf-path", options_.target}, {"--output-hf-path (rejected)", rejected}};
}

void MergedModelSink::Begin(const writer::ExportAnnouncement& announcement) {
  const fs::path target = fs::absolute(options_.target).lexically_normal();
  fs::path scratch = target.parent_path() / ("." + target.filename().string() + ".merge-adapter");
  open_.reset(new Open{writer::PeftDirectorySink(scratch, false), {}, {}, {}, 0});
  open_->adapter.Begin(announcement);

  // Everything about the output is known now, so the output is laid out before the export
  // starts: a target that may not be replaced, or a base that does not fit the adapter, fails
  // before any work.
  std::vector<std::string> modules;
  for (const auto& t : announcement.tensors) {
    if (modules.empty() || modules.back() != t.module) modules.push_back(t.module);
  }
  std::sort(modules.begin(), modules.end());
  modules.erase(std::unique(modules.begin(), modules.end()), modules.end());
  const BaseWeights base = BaseWeights::Open(options_.base_model);
  const MergedLayout layout =
      PlanMergedLayout(base, modules, options_.dtype, options_.max_shard_bytes, world_.size());
  const std::vector<std::string> copied = CopiedFiles(options_.base_model);
  std::set<std::string> owned(copied.begin(), copied.end());
  owned.insert(kConfigFile);
  owned.insert(kIndexFile);
  for (const auto& shard : layout.shards) owned.insert(shard.file);
  open_->output.emplace(writer::StagedDirectory::Create(target, options_.overwrite, owned,
                                                        writer::kUnverifiedSuffix));
  writer::StagedDirectory& output = *open_->output;
  const auto add = [&](const std::string& name, const std::string& text) {
    output.AddFile(name).Write(text);
    open_->file_bytes += text.size();
  };
  add(kConfigFile, MergedConfig(options_.base_model, options_.dtype));
  for (const std::string& name : copied)
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
    const auto start = Clock::now();
    if (!fs::is_directory(staging))
      Fail(
          "rank {} cannot see the staging directory '{}': --output-hf-path must be on a file "
          "system every rank sees",
          world_.rank(), staging.string());
    const BaseWeights base = BaseWeights::Open(options_.base_model);
    const safetensors::File adapter =
        safetensors::File::Open(adapter_dir / writer::kAdapterWeightsFile);
    const double alpha = AdapterAlpha(adapter_dir);
    const std::map<std::string, ModuleAdapter> parts = AdapterModules(adapter);
    std::vector<std::string> modules;
    for (const auto& [module, unused] : parts) modules.push_back(module);
    const MergedLayout layout =
        PlanMergedLayout(base, modules, options_.dtype, options_.max_shard_bytes, world_.size());

    std::map<std::size_t, UniqueFd> files;  // the shards this rank writes into
    std::vector<std::byte> in_bytes, out_bytes;
    for (const OutputTensor& t : layout.tensors) {
      if (t.rank != world_.rank()) continue;
      const fs::path path = staging / layout.shards[t.shard].file;
      auto file = files.find(t.shard);
      if (file == files.end()) {
        UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
        if (!fd.valid()) Fail<IoError>("cannot open '{}': {}", path.string(), std::strerror(errno));
        file = files.emplace(t.shard, std::move(fd)).first;
      }
      const auto& entry = t.base->entry;
      in_bytes.resize(entry.end - entry.begin);
      base.Read(*t.base, in_bytes);
      std::span<const std::byte> bytes = in_bytes;
      if (t.module || t.dtype != entry.dtype) {
        std::vector<float> values = ToFloat32(in_bytes, entry.dtype);
        if (t.module) {
          const LowRankUpdate update =
              LoadUpdate(adapter, *t.module, parts.at(*t.module), alpha, t);
          MergeInto(values, t.shape[0], t.shape[1], update, options_.threads);
          ++stats_.tensors_merged;
        }
        out_bytes.resize(t.nbytes);
        FromFloat32(values, t.dtype, out_bytes);
        bytes = out_bytes;
      }
      WriteAllAt(file->second.get(), t.offset, bytes, path);
      stats_.bytes_written += bytes.size();
    }
    for (auto& [shard, fd] : files) {
      const fs::path path = staging / layout.shards[shard].file;
      if (::fsync(fd.get()) != 0)
        Fail<IoError>("cannot flush '{}': {}", path.string(), std::strerror(errno));
      fd.Close(path);
    }
    stats_.base_bytes_read = base.bytes_read();
    stats_.seconds = std::chrono::duration<double>(Clock::now() - start).count();
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
