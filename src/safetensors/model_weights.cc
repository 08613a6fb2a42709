#include "adapter_job/safetensors/model_weights.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>

#include "adapter_job/core/error.h"
#include "adapter_job/core/json_file.h"

namespace adapter_job::safetensors {
namespace {

namespace fs = std::filesystem;

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

// The shard files an index names, in first-mention order, and which tensor each one should hold.
std::map<std::string, std::string> ReadIndex(const fs::path& index_path) {
  const nlohmann::json index = ReadJsonFile(index_path);
  const auto map = index.find("weight_map");
  if (map == index.end() || !map->is_object() || map->empty())
    Fail("'{}' has no \"weight_map\" object naming the shard of each tensor", index_path.string());
  std::map<std::string, std::string> shard_of;
  for (const auto& [name, file] : map->items()) {
    if (!file.is_string())
      Fail("'{}': weight_map[\"{}\"] is {}, expected a file name", index_path.string(), name,
           file.dump());
    const fs::path shard = file.get<std::string>();
    if (shard.has_parent_path() || shard.filename() == ".." || shard.empty())
      Fail("'{}': weight_map[\"{}\"] is '{}', expected a file name in the model directory",
           index_path.string(), name, shard.string());
    shard_of.emplace(name, shard.string());
  }
  return shard_of;
}

Header ReadHeader(const ReadOnlyFile& file) {
  if (file.size() < 8) Fail("'{}' is too short for a safetensors file", file.path().string());
  std::array<std::byte, 8> prefix;
  file.ReadExact(0, prefix);
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | std::to_integer<uint64_t>(prefix[i]);
  if (length > kMaxHeaderBytes || length > file.size() - 8)
    Fail("'{}': header length {} does not fit the file ({} bytes)", file.path().string(), length,
         file.size());
  const std::vector<std::byte> bytes = file.Read(8, length);
  try {
    return ParseHeader(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                       file.size());
  } catch (const Error& e) {
    Fail("'{}': {}", file.path().string(), e.what());
  }
}

}  // namespace

ModelWeights ModelWeights::Open(const fs::path& model_dir) {
  ModelWeights weights;
  std::map<std::string, std::string> shard_of;
  std::vector<std::string> files;
  if (fs::exists(model_dir / kIndexFile)) {
    shard_of = ReadIndex(model_dir / kIndexFile);
    for (const auto& [name, file] : shard_of) {
      if (std::find(files.begin(), files.end(), file) == files.end()) files.push_back(file);
    }
    std::sort(files.begin(), files.end());
  } else if (fs::exists(model_dir / kSingleFile)) {
    files = {kSingleFile};
  } else {
    Fail("'{}' holds neither {} nor {}: the base model's weights are needed", model_dir.string(),
         kSingleFile, kIndexFile);
  }
  for (const std::string& name : files) {
    const std::size_t index = weights.files_.size();
    weights.files_.push_back(ReadOnlyFile::Open(model_dir / name));
    const ReadOnlyFile& file = weights.files_.back();
    const Header header = ReadHeader(file);
    for (const auto& entry : header.tensors) {
      if (!shard_of.empty()) {
        const auto listed = shard_of.find(entry.name);
        if (listed == shard_of.end() || listed->second != name) continue;  // as transformers
      }
      Tensor tensor{index, entry, header.data_offset + entry.begin};
      if (!weights.tensors_.emplace(entry.name, std::move(tensor)).second)
        Fail("'{}': tensor '{}' is also in another shard", file.path().string(), entry.name);
    }
  }
  for (const auto& [name, file] : shard_of) {
    if (!weights.tensors_.count(name))
      Fail("'{}': weight_map names '{}' in '{}', which does not hold it",
           (model_dir / kIndexFile).string(), name, file);
  }
  return weights;
}

const ModelWeights::Tensor* ModelWeights::Find(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const fs::path& ModelWeights::PathOf(const Tensor& tensor) const {
  return files_.at(tensor.file).path();
}

void ModelWeights::Read(const Tensor& tensor, uint64_t from, std::span<std::byte> out) const {
  if (from + out.size() > tensor.entry.end - tensor.entry.begin)
    Fail("reading past the end of '{}' in '{}'", tensor.entry.name, PathOf(tensor).string());
  files_.at(tensor.file).ReadExact(tensor.offset + from, out);
}

uint64_t ModelWeights::bytes_read() const {
  uint64_t total = 0;
  for (const auto& file : files_) total += file.bytes_read();
  return total;
}

}  // namespace adapter_job::safetensors
