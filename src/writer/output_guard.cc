#include "adapter_job/writer/output_guard.h"

#include <algorithm>

#include "adapter_job/core/error.h"

namespace adapter_job::writer {
namespace {

namespace fs = std::filesystem;

fs::path Resolved(const fs::path& path) {
  std::error_code ec;
  fs::path resolved = fs::weakly_canonical(fs::absolute(path), ec);
  if (ec) resolved = fs::absolute(path);
  return resolved.lexically_normal();
}

// `inner` is `outer` or below it, component by component ("/a/bc" is not below "/a/b").
bool Within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin();
  for (auto o = outer.begin(); o != outer.end(); ++o, ++i) {
    if (o->empty()) continue;  // a trailing separator
    if (i == inner.end() || *i != *o) return false;
  }
  return true;
}

}  // namespace

void RefuseOutputsOverInputs(const std::vector<NamedPath>& outputs,
                             const std::vector<NamedPath>& inputs) {
  for (const auto& out : outputs) {
    if (out.path.empty()) continue;
    const fs::path o = Resolved(out.path);
    for (const auto& in : inputs) {
      if (in.path.empty()) continue;
      const fs::path i = Resolved(in.path);
      const char* relation = o == i         ? "is"
                             : Within(i, o) ? "contains"
                             : Within(o, i) ? "lies inside"
                                            : nullptr;
      if (relation != nullptr) {
        Fail(
            "{} '{}' {} {} '{}': an output must never be written over an input; choose "
            "another path",
            out.what, out.path.string(), relation, in.what, in.path.string());
      }
    }
  }
}

}  // namespace adapter_job::writer
