// Byte-compatible with the reference writer (safetensors/src/tensor.rs `prepare`/`serialize`):
// compact serde_json header, `__metadata__` first, then entries by dtype descending and name.
#include <algorithm>
#include <nlohmann/json.hpp>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::safetensors {

TensorRef Ref(std::string name, const Tensor& tensor) {
  return TensorRef{std::move(name), tensor.dtype, tensor.shape, tensor.data};
}

std::string SerializeHeader(std::vector<TensorRef>& tensors,
                            const std::optional<std::map<std::string, std::string>>& metadata) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorRef& a, const TensorRef& b) {
    if (a.dtype != b.dtype) return a.dtype > b.dtype;
    return a.name < b.name;
  });
  std::vector<std::string_view> names;
  for (const auto& t : tensors) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  if (auto dup = std::adjacent_find(names.begin(), names.end()); dup != names.end()) {
    Fail("tensor name '{}' appears twice", *dup);
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (metadata) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : *metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    if (t.name == "__metadata__") Fail("'__metadata__' is reserved and cannot name a tensor");
    const auto dtype_name = SafetensorsName(t.dtype);
    if (!dtype_name)
      Fail("tensor '{}': safetensors has no dtype for {}", t.name, TorchName(t.dtype));
    const uint64_t bytes =
        CheckedMul(CheckedNumel(t.shape, "tensor shape"), ItemSize(t.dtype), "tensor bytes");
    if (bytes != t.data.size()) {
      Fail("tensor '{}': shape {} needs {} bytes, given {}", t.name, ShapeToString(t.shape), bytes,
           t.data.size());
    }
    nlohmann::ordered_json entry;
    entry["dtype"] = *dtype_name;
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + bytes};
    header[t.name] = std::move(entry);
    offset += bytes;
  }
  std::string json;
  try {
    json = header.dump();
  } catch (const nlohmann::json::exception& e) {
    Fail("cannot encode header (names must be valid UTF-8): {}", e.what());
  }
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

void Write(const std::filesystem::path& path, std::vector<TensorRef> tensors,
           const std::optional<std::map<std::string, std::string>>& metadata, bool overwrite) {
  WithContext([&] { return path.string(); },
              [&] {
                const std::string header = SerializeHeader(tensors, metadata);
                OutputFile out = OutputFile::Create(path, overwrite);
                out.Write(header);
                for (const auto& t : tensors) out.Write(t.data);
                std::move(out).Commit();
              });
}

}  // namespace adapter_job::safetensors
