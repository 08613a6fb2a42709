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

namespace {

// The reference's order: dtype descending (its Dtype enum order, which DType mirrors), then name.
template <typename T>
void SortIntoFileOrder(std::vector<T>& tensors) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const T& a, const T& b) {
    if (a.dtype != b.dtype) return a.dtype > b.dtype;
    return a.name < b.name;
  });
}

uint64_t SpecBytes(const TensorSpec& t) {
  return CheckedMul(CheckedNumel(t.shape, "tensor shape"), ItemSize(t.dtype), "tensor bytes");
}

}  // namespace

std::string SerializeHeader(std::vector<TensorSpec>& specs,
                            const std::optional<std::map<std::string, std::string>>& metadata) {
  SortIntoFileOrder(specs);
  std::vector<std::string_view> names;
  for (const auto& t : specs) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  if (auto dup = std::adjacent_find(names.begin(), names.end()); dup != names.end()) {
    Fail("tensor name '{}' appears twice", *dup);
  }

  // The object is written entry by entry: names are unique (checked above), and an ordered_json
  // object would search its keys on every insert, quadratic for an MoE adapter's 37,000 tensors.
  std::string json = "{";
  const auto add = [&](const std::string& key, const nlohmann::ordered_json& value) {
    try {
      if (json.size() > 1) json += ',';
      json += nlohmann::json(key).dump();
      json += ':';
      json += value.dump();
    } catch (const nlohmann::json::exception& e) {
      Fail("cannot encode header (names must be valid UTF-8): {}", e.what());
    }
  };
  if (metadata) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : *metadata) m[k] = v;
    add("__metadata__", m);
  }
  uint64_t offset = 0;
  for (const auto& t : specs) {
    if (t.name == "__metadata__") Fail("'__metadata__' is reserved and cannot name a tensor");
    const auto dtype_name = SafetensorsName(t.dtype);
    if (!dtype_name)
      Fail("tensor '{}': safetensors has no dtype for {}", t.name, TorchName(t.dtype));
    const uint64_t bytes = SpecBytes(t);
    nlohmann::ordered_json entry;
    entry["dtype"] = *dtype_name;
    entry["shape"] = t.shape;
    entry["data_offsets"] = {offset, offset + bytes};
    add(t.name, entry);
    offset += bytes;
  }
  json += '}';
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json;
}

uint64_t FileSize(std::vector<TensorSpec> specs,
                  const std::optional<std::map<std::string, std::string>>& metadata) {
  uint64_t bytes = SerializeHeader(specs, metadata).size();
  for (const auto& spec : specs) bytes += SpecBytes(spec);
  return bytes;
}

StreamWriter::StreamWriter(OutputFile& file, std::vector<TensorSpec> specs,
                           const std::optional<std::map<std::string, std::string>>& metadata)
    : file_(file) {
  const std::string header = SerializeHeader(specs, metadata);
  uint64_t offset = header.size();
  for (const auto& spec : specs) {
    const uint64_t bytes = SpecBytes(spec);
    const auto [slot, added] = slots_.emplace(spec.name, Slot{offset, bytes, false});
    if (added) in_file_order_.push_back(&slot->second);  // (SerializeHeader refused duplicates)
    offset += bytes;
  }
  file_size_ = offset;
  file_.Resize(file_size_);
  file_.WriteAt(0, std::as_bytes(std::span(header)));
  written_prefix_ = in_file_order_.empty() ? file_size_ : header.size();
}

void StreamWriter::Write(const std::string& name, std::span<const std::byte> data) {
  const std::span<const std::byte> pieces[] = {data};
  Write(name, pieces);
}

void StreamWriter::Write(const std::string& name,
                         std::span<const std::span<const std::byte>> pieces) {
  const auto it = slots_.find(name);
  if (it == slots_.end()) Fail("tensor '{}' was not planned", name);
  Slot& slot = it->second;
  if (slot.written) Fail("tensor '{}' written twice", name);
  uint64_t size = 0;
  for (const auto& piece : pieces) size += piece.size();
  if (size != slot.size) Fail("tensor '{}' has {} bytes, planned {}", name, size, slot.size);
  file_.WriteAt(slot.offset, pieces);
  slot.written = true;
  while (first_missing_ < in_file_order_.size() && in_file_order_[first_missing_]->written)
    ++first_missing_;
  written_prefix_ =
      first_missing_ < in_file_order_.size() ? in_file_order_[first_missing_]->offset : file_size_;
}

void StreamWriter::Finish() const {
  for (const auto& [name, slot] : slots_) {
    if (!slot.written) Fail("tensor '{}' was never written", name);
  }
}

void Write(const std::filesystem::path& path, std::vector<TensorRef> tensors,
           const std::optional<std::map<std::string, std::string>>& metadata, bool overwrite) {
  WithContext([&] { return path.string(); },
              [&] {
                SortIntoFileOrder(tensors);
                std::vector<TensorSpec> specs;
                for (const auto& t : tensors) {
                  specs.push_back({t.name, t.dtype, t.shape});
                  if (SpecBytes(specs.back()) != t.data.size()) {
                    Fail("tensor '{}': shape {} needs {} bytes, given {}", t.name,
                         ShapeToString(t.shape), SpecBytes(specs.back()), t.data.size());
                  }
                }
                const std::string header = SerializeHeader(specs, metadata);
                OutputFile out = OutputFile::Create(path, overwrite);
                out.Write(header);
                for (const auto& t : tensors) out.Write(t.data);
                std::move(out).Commit();
              });
}

}  // namespace adapter_job::safetensors
