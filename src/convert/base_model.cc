// The HF cache layout (huggingface_hub file_download.py, constants.py): models--<org>--<name>/
// refs/<revision> holds a commit hash, snapshots/<hash>/ the files of that commit.
#include "adapter_job/convert/base_model.h"

#include <cctype>
#include <cstdlib>
#include <regex>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::convert {
namespace {

namespace fs = std::filesystem;

// A hub id is "name" or "org/name"; anything a shell user types as a path is a path.
bool LooksLikePath(const std::string& text) {
  if (text.starts_with("/") || text.starts_with("./") || text.starts_with("../") ||
      text.starts_with("~") || text == "." || text == "..")
    return true;
  const fs::path parent = fs::path(text).parent_path();
  std::error_code ec;
  return !parent.empty() && fs::is_directory(parent, ec);
}

// huggingface_hub's repo id rules (validate_repo_id): one optional "org/", letters, digits, and
// "-_." inside, no "--" or "..".
bool IsRepoId(const std::string& text) {
  static const std::regex kRepoId(R"(^([\w\-.]{1,96}/)?[\w\-.]{1,96}$)");
  return std::regex_match(text, kRepoId) && text.find("--") == std::string::npos &&
         text.find("..") == std::string::npos && !text.starts_with('.') && !text.ends_with('.');
}

const char* Env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : nullptr;
}

bool IsCommitHash(const std::string& text) {
  static const std::regex kHash("^[0-9a-f]{40}$");
  return std::regex_match(text, kHash);
}

// "org/name" when `dir` is a snapshot of the HF cache (models--org--name/snapshots/<hash>).
std::optional<std::string> RepoIdOfSnapshot(const fs::path& dir) {
  std::error_code ec;
  const fs::path canonical = fs::weakly_canonical(dir, ec);
  if (ec) return std::nullopt;
  const fs::path snapshots = canonical.parent_path();
  const std::string repo = snapshots.parent_path().filename().string();
  if (snapshots.filename() != "snapshots" || !repo.starts_with("models--") ||
      !IsCommitHash(canonical.filename().string()))
    return std::nullopt;
  std::string id = repo.substr(8);
  if (const auto sep = id.find("--"); sep != std::string::npos) id.replace(sep, 2, "/");
  return IsRepoId(id) ? std::optional(id) : std::nullopt;
}

}  // namespace

fs::path HfHubCache() {
  if (const char* cache = Env("HF_HUB_CACHE")) return cache;
  if (const char* home = Env("HF_HOME")) return fs::path(home) / "hub";
  if (const char* xdg = Env("XDG_CACHE_HOME")) return fs::path(xdg) / "huggingface" / "hub";
  const char* home = Env("HOME");
  return fs::path(home != nullptr ? home : "/") / ".cache" / "huggingface" / "hub";
}

BaseModel ResolveBaseModel(const std::string& hf_model_id, const std::string& revision) {
  BaseModel base;
  base.id = base.name = hf_model_id;
  if (hf_model_id.empty()) Fail("--hf-model-id is empty: expected a local HF model directory");
  std::error_code ec;
  const fs::path path(hf_model_id);
  const auto status = fs::status(path, ec);
  if (fs::is_directory(status)) {
    base.dir = path;
    if (auto id = RepoIdOfSnapshot(path)) base.name = *id;
    return base;
  }
  if (fs::exists(status)) {
    Fail(
        "--hf-model-id '{}' is a file; expected a local HF model directory (config.json and "
        "safetensors weights) or a model id",
        hf_model_id);
  }
  if (LooksLikePath(hf_model_id)) {
    Fail(
        "--hf-model-id '{}' looks like a local path but does not exist (a model id has the form "
        "'org/name')",
        hf_model_id);
  }
  if (!IsRepoId(hf_model_id)) {
    Fail("--hf-model-id '{}' is neither a local directory nor a model id of the form 'org/name'",
         hf_model_id);
  }
  std::string folder = "models--" + hf_model_id;
  if (const auto slash = folder.find('/'); slash != std::string::npos)
    folder.replace(slash, 1, "--");
  const fs::path repo = HfHubCache() / folder;
  if (!fs::is_directory(repo, ec)) return base;  // not downloaded: only recorded
  std::string commit = revision;
  if (!IsCommitHash(revision)) {
    const fs::path ref = repo / "refs" / revision;
    if (!fs::is_regular_file(ref, ec)) {
      Fail(
          "--hf-model-id '{}' is in the HF cache ({}) but not at revision '{}' (no {}); download "
          "that revision, or pass --revision with one the cache holds",
          hf_model_id, repo.string(), revision, ref.string());
    }
    commit = ReadTextFile(ref, 1024);
    while (!commit.empty() && std::isspace(static_cast<unsigned char>(commit.back())))
      commit.pop_back();
  }
  const fs::path snapshot = repo / "snapshots" / commit;
  if (!IsCommitHash(commit) || !fs::is_directory(snapshot, ec)) {
    Fail("--hf-model-id '{}' at revision '{}': the HF cache has no snapshot {}", hf_model_id,
         revision, snapshot.string());
  }
  base.dir = snapshot;
  base.resolved_how = fmt::format("'{}' at revision '{}' from the HF cache: {}", hf_model_id,
                                  revision, snapshot.string());
  return base;
}

BaseModel ResolveRecordedBaseModel(const std::optional<std::string>& recorded,
                                   const fs::path& run_config, const std::string& revision) {
  if (!recorded) {
    Fail("--hf-model-id is not given and {} records no model.hf_model_id: pass the base model",
         run_config.string());
  }
  try {
    return ResolveBaseModel(*recorded, revision);
  } catch (const FormatError& e) {
    Fail("--hf-model-id is not given, and the base model {} records cannot be used here: {}",
         run_config.string(), e.what());
  }
}

}  // namespace adapter_job::convert
