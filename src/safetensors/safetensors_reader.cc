// Validation mirrors safetensors/src/tensor.rs (read_metadata, Metadata::validate).
#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/safetensors/safetensors.h"

namespace adapter_job::safetensors {
namespace {

using Json = nlohmann::json;

Json ParseJsonRejectingDuplicates(std::string_view text) {
  std::set<std::string> top_level_keys;
  const Json::parser_callback_t reject_duplicates = [&](int depth, Json::parse_event_t event,
                                                        Json& parsed) {
    if (event == Json::parse_event_t::key && depth == 1) {
      const auto key = parsed.get<std::string>();
      if (!top_level_keys.insert(key).second) Fail("header names '{}' twice", key);
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), reject_duplicates);
  } catch (const Json::exception& e) {
    Fail("header is not valid JSON: {}", e.what());
  }
}

uint64_t AsOffset(const Json& value, const std::string& name) {
  if (!value.is_number_unsigned())
    Fail("tensor '{}': data_offsets must be non-negative integers", name);
  return value.get<uint64_t>();
}

}  // namespace

Header ParseHeader(std::string_view header_bytes, uint64_t file_size) {
  const Json root = ParseJsonRejectingDuplicates(header_bytes);
  if (!root.is_object()) Fail("header is not a JSON object");
  Header header;
  header.data_offset = 8 + header_bytes.size();
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) Fail("__metadata__ must be an object of strings");
      std::map<std::string, std::string> metadata;
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string()) Fail("__metadata__['{}'] is not a string", k);
        metadata[k] = v.get<std::string>();
      }
      header.metadata = std::move(metadata);
      continue;
    }
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      Fail("tensor '{}' needs dtype, shape and data_offsets", name);
    }
    TensorEntry t;
    t.name = name;
    const Json& dtype = entry["dtype"];
    const auto parsed_dtype =
        dtype.is_string() ? DTypeFromSafetensorsName(dtype.get<std::string>()) : std::nullopt;
    if (!parsed_dtype) Fail("tensor '{}' has unsupported dtype {}", name, dtype.dump());
    t.dtype = *parsed_dtype;
    if (!entry["shape"].is_array()) Fail("tensor '{}': shape must be a list", name);
    for (const Json& d : entry["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
        Fail("tensor '{}': shape entries must be non-negative integers", name);
      }
      t.shape.push_back(d.get<int64_t>());
    }
    const Json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2) {
      Fail("tensor '{}': data_offsets must be [begin, end]", name);
    }
    t.begin = AsOffset(offsets[0], name);
    t.end = AsOffset(offsets[1], name);
    if (t.end < t.begin)
      Fail("tensor '{}': data_offsets [{}, {}) end before they begin", name, t.begin, t.end);
    const uint64_t expected =
        CheckedMul(CheckedNumel(t.shape, "tensor shape"), ItemSize(t.dtype), "tensor bytes");
    if (t.end - t.begin != expected) {
      Fail("tensor '{}': {} {} needs {} bytes but data_offsets span {}", name,
           SafetensorsName(t.dtype).value_or("?"), ShapeToString(t.shape), expected,
           t.end - t.begin);
    }
    header.tensors.push_back(std::move(t));
  }
  // The data section must be covered exactly: no gaps, no overlaps, nothing after the end.
  std::vector<const TensorEntry*> by_offset;
  for (const auto& t : header.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return std::pair(a->begin, a->end) < std::pair(b->begin, b->end);
  });
  uint64_t expected_begin = 0;
  for (const TensorEntry* t : by_offset) {
    if (t->begin != expected_begin) {
      Fail("tensor '{}' starts at data offset {}, expected {} (gap or overlap)", t->name, t->begin,
           expected_begin);
    }
    expected_begin = t->end;
  }
  const uint64_t total = CheckedAdd(header.data_offset, expected_begin, "file size");
  if (total != file_size) {
    Fail("tensors end at byte {} but the file has {} bytes", total, file_size);
  }
  return header;
}

Header ParseFileHeader(std::span<const std::byte> bytes) {
  if (bytes.size() < 8) Fail("{} bytes is too small for a safetensors file", bytes.size());
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(bytes[i]) << (8 * i);
  if (n > kMaxHeaderBytes) Fail("header length {} exceeds the {}-byte limit", n, kMaxHeaderBytes);
  if (n > bytes.size() - 8) Fail("header length {} runs past the {}-byte file", n, bytes.size());
  return ParseHeader({reinterpret_cast<const char*>(bytes.data() + 8), n}, bytes.size());
}

File File::Open(const std::filesystem::path& path) {
  return WithContext([&] { return path.string(); },
                     [&] {
                       MappedFile map = MappedFile::Open(path);
                       Header header = ParseFileHeader(map.bytes());
                       return File(std::move(map), std::move(header));
                     });
}

const TensorEntry* File::Find(std::string_view name) const {
  for (const auto& t : header_.tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

const TensorEntry& File::Get(std::string_view name) const {
  const TensorEntry* t = Find(name);
  if (t == nullptr) Fail("{}: no tensor named '{}'", path().string(), name);
  return *t;
}

std::span<const std::byte> File::Data(const TensorEntry& entry) const {
  return map_.bytes().subspan(header_.data_offset + entry.begin, entry.end - entry.begin);
}

StridedView File::View(const TensorEntry& entry) const {
  return StridedView{entry.dtype, entry.shape, ContiguousStrides(entry.shape), Data(entry).data()};
}

}  // namespace adapter_job::safetensors
