#include "output_files.h"

#include <sys/stat.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <string>

#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/core/error.h"

namespace adapter_job::cli {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

constexpr std::array<const char*, 2> kAdapterFiles = {"adapter_model.safetensors",
                                                      "adapter_config.json"};

bool IsWeights(const fs::path& name) { return name.extension() == ".safetensors"; }

Json StatOf(const fs::path& file) {
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    Fail<IoError>("cannot stat {}: {}", file.string(), std::strerror(errno));
  return {{"bytes", static_cast<std::uint64_t>(st.st_size)},
          {"modified_ns",
           static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec}};
}

const Json* ObjectMember(const Json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it != j.end() && it->is_object() ? &*it : nullptr;
}

// The sha256 of `output`/`name`: the report's, when it hashed a file of that size.
std::string Sha256Of(const fs::path& output, const std::string& name, const Json& report) {
  const Json* provenance = ObjectMember(report, "provenance");
  const auto listed = provenance ? provenance->find("output_files") : Json::const_iterator();
  if (provenance && listed != provenance->end() && listed->is_array()) {
    for (const Json& file : *listed) {
      if (!file.is_object() || file.value("name", "") != name || !file.contains("sha256")) continue;
      std::error_code ec;
      if (file.value("bytes", uint64_t{0}) == fs::file_size(output / name, ec) && !ec)
        return file["sha256"].get<std::string>();
    }
  }
  return checkpoint::Sha256File(output / name);
}

}  // namespace

Json RecordOutputFiles(ExportCommand command, const fs::path& output, const Json& report) {
  Json files = Json::object();
  if (command != ExportCommand::kMerge) {
    for (const char* name : kAdapterFiles) files[name] = Sha256Of(output, name, report);
    return {{"files", files}};
  }
  Json weights = Json::object();
  std::error_code ec;
  for (fs::directory_iterator it(output, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file(ec)) continue;
    const fs::path name = it->path().filename();
    if (IsWeights(name)) {
      weights[name.string()] = StatOf(it->path());
    } else {
      files[name.string()] = Sha256Of(output, name.string(), report);
    }
  }
  if (ec) Fail<IoError>("cannot list {}: {}", output.string(), ec.message());
  return {{"files", files}, {"weights", weights}};
}

bool OutputUnchanged(ExportCommand command, const fs::path& output, const Json& recorded) {
  const Json* files = ObjectMember(recorded, "files");
  if (!files) return false;
  const Json* weights = ObjectMember(recorded, "weights");
  if (command == ExportCommand::kMerge) {
    // A model is at least its config and one weights file.
    if (!weights || weights->empty() || !files->contains("config.json")) return false;
  } else {
    for (const char* name : kAdapterFiles) {
      if (!files->contains(name)) return false;
    }
  }
  try {
    for (const auto& [name, digest] : files->items()) {
      if (fs::path(name).filename() != name || digest != checkpoint::Sha256File(output / name)) {
        return false;
      }
    }
    if (!weights) return true;
    for (const auto& [name, identity] : weights->items()) {
      if (fs::path(name).filename() != name || identity != StatOf(output / name)) return false;
    }
  } catch (const Error&) {
    return false;  // a file is gone or unreadable: not the output that was made
  }
  return true;
}

}  // namespace adapter_job::cli
