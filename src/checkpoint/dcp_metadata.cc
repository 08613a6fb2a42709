#include "adapter_job/checkpoint/dcp_metadata.h"

#include <set>

#include "adapter_job/checkpoint/pickle.h"
#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::checkpoint {
namespace {

using pickle::Kind;
using pickle::Value;

constexpr std::size_t kMaxMetadataBytes = std::size_t{4} << 30;

bool HasClassName(const Value& value, std::string_view name) {
  return value.kind == Kind::kObject && value.cls != nullptr && value.cls->kind == Kind::kGlobal &&
         value.cls->name == name;
}

const Value& RequireAttribute(const Value& object, std::string_view name, std::string_view owner) {
  const Value* v = pickle::FindAttribute(object, name);
  if (v == nullptr) Fail("{} has no field '{}': {}", owner, name, pickle::Describe(object));
  return *v;
}

// torch.Size(tuple) is REDUCE(torch.Size, ((d0, d1, ...),)); plain tuples are accepted too.
std::vector<int64_t> AsSize(const Value& value, std::string_view what) {
  if (value.kind == Kind::kObject && value.cls && value.cls->IsGlobal("torch", "Size")) {
    const auto& args = pickle::AsSequence(*value.args, what);
    if (args.empty()) return {};
    if (args.size() != 1) Fail("{}: torch.Size takes one argument, found {}", what, args.size());
    return pickle::AsIntSequence(*args[0], what);
  }
  return pickle::AsIntSequence(value, what);
}

DType AsDType(const Value& value, std::string_view what) {
  if (value.kind == Kind::kGlobal && value.text == "torch") {
    if (auto dtype = DTypeFromTorchName(value.name)) return *dtype;
  }
  Fail("{} is not a known torch dtype: {}", what, pickle::Describe(value));
}

// TensorProperties pickles its state as the tuple (dtype, layout, requires_grad, memory_format,
// pin_memory); older or hand-made files may carry a dict with a 'dtype' field.
DType PropertiesDType(const Value& properties, std::string_view fqn) {
  const std::string what = fmt::format("dtype of '{}'", fqn);
  if (properties.kind == Kind::kObject && properties.state != nullptr) {
    if (properties.state->kind == Kind::kTuple && !properties.state->items.empty()) {
      return AsDType(*properties.state->items[0], what);
    }
    if (const Value* dtype = pickle::FindAttribute(properties, "dtype"))
      return AsDType(*dtype, what);
  }
  Fail("{}: TensorProperties without a dtype: {}", fqn, pickle::Describe(properties));
}

TensorMeta ParseTensor(const std::string& fqn, const Value& meta) {
  TensorMeta tensor;
  tensor.fqn = fqn;
  const std::string owner = fmt::format("TensorStorageMetadata of '{}'", fqn);
  tensor.dtype = PropertiesDType(RequireAttribute(meta, "properties", owner), fqn);
  tensor.size = AsSize(RequireAttribute(meta, "size", owner), owner + ".size");
  CheckedNumel(tensor.size, "global size");
  for (const Value* chunk : pickle::AsSequence(RequireAttribute(meta, "chunks", owner), owner)) {
    ChunkMeta c;
    c.offsets = AsSize(RequireAttribute(*chunk, "offsets", owner), owner + " chunk offsets");
    c.sizes = AsSize(RequireAttribute(*chunk, "sizes", owner), owner + " chunk sizes");
    if (c.offsets.size() != tensor.size.size() || c.sizes.size() != tensor.size.size()) {
      Fail("'{}': chunk at {} of size {} does not match the rank of global size {}", fqn,
           ShapeToString(c.offsets), ShapeToString(c.sizes), ShapeToString(tensor.size));
    }
    for (std::size_t d = 0; d < tensor.size.size(); ++d) {
      if (c.offsets[d] < 0 || c.sizes[d] < 0 ||
          CheckedAdd(static_cast<uint64_t>(c.offsets[d]), static_cast<uint64_t>(c.sizes[d]),
                     "chunk end") > static_cast<uint64_t>(tensor.size[d])) {
        Fail("'{}': chunk at {} of size {} lies outside global size {}", fqn,
             ShapeToString(c.offsets), ShapeToString(c.sizes), ShapeToString(tensor.size));
      }
    }
    tensor.chunks.push_back(std::move(c));
  }
  return tensor;
}

StorageLocation ParseStorageInfo(const Value& info, std::string_view where) {
  const std::string owner = fmt::format("_StorageInfo of {}", where);
  StorageLocation location;
  location.relative_path = pickle::AsString(RequireAttribute(info, "relative_path", owner), owner);
  const int64_t offset = pickle::AsInt(RequireAttribute(info, "offset", owner), owner + ".offset");
  const int64_t length = pickle::AsInt(RequireAttribute(info, "length", owner), owner + ".length");
  if (offset < 0 || length < 0) Fail("{}: negative offset {} or length {}", owner, offset, length);
  location.offset = static_cast<uint64_t>(offset);
  location.length = static_cast<uint64_t>(length);
  if (const Value* transforms = pickle::FindAttribute(info, "transform_descriptors");
      transforms != nullptr && transforms->kind != Kind::kNone) {
    for (const Value* t : pickle::AsSequence(*transforms, owner + ".transform_descriptors")) {
      location.transform_descriptors.push_back(pickle::AsString(*t, "transform descriptor"));
    }
  }
  // Never trust a path to stay inside the checkpoint directory.
  const std::filesystem::path path(location.relative_path);
  if (location.relative_path.empty() || path.is_absolute() ||
      location.relative_path.find("..") != std::string::npos) {
    Fail("{}: file name '{}' is not a plain relative path", owner, location.relative_path);
  }
  return location;
}

}  // namespace

uint64_t TensorMeta::nbytes() const {
  return CheckedMul(CheckedNumel(size, "global size"), ItemSize(dtype), "tensor bytes");
}

const TensorMeta* DcpMetadata::FindTensor(std::string_view fqn) const {
  for (const auto& t : tensors) {
    if (t.fqn == fqn) return &t;
  }
  return nullptr;
}

const StorageLocation& DcpMetadata::Locate(const TensorMeta& tensor, const ChunkMeta& chunk) const {
  const auto it = tensor_storage.find({tensor.fqn, chunk.offsets});
  if (it == tensor_storage.end()) {
    Fail("'{}': no storage entry for the chunk at offsets {}", tensor.fqn,
         ShapeToString(chunk.offsets));
  }
  return it->second;
}

DcpMetadata ParseDcpMetadata(std::span<const std::byte> pickle_bytes) {
  const pickle::Document doc = pickle::Unpickle(pickle_bytes);
  const Value& root = doc.root();
  if (root.kind != Kind::kObject) {
    Fail("the pickle holds {}, not a checkpoint Metadata object", pickle::Describe(root));
  }
  const Value& state_dict = RequireAttribute(root, "state_dict_metadata", "Metadata");
  const Value& storage = RequireAttribute(root, "storage_data", "Metadata");
  if (state_dict.kind != Kind::kDict || storage.kind != Kind::kDict) {
    Fail("Metadata.state_dict_metadata and storage_data must be dicts");
  }

  DcpMetadata out;
  if (const Value* version = pickle::FindAttribute(root, "version");
      version != nullptr && version->kind == Kind::kString) {
    out.version = version->text;
  }
  std::set<std::string> seen;
  for (const auto& [key, meta] : state_dict.entries) {
    const std::string& fqn = pickle::AsString(*key, "state_dict_metadata key");
    if (!seen.insert(fqn).second) Fail("key '{}' appears twice in state_dict_metadata", fqn);
    if (HasClassName(*meta, "BytesStorageMetadata")) {
      out.byte_items.push_back(fqn);
    } else if (HasClassName(*meta, "TensorStorageMetadata") ||
               pickle::FindAttribute(*meta, "chunks") != nullptr) {
      out.tensors.push_back(ParseTensor(fqn, *meta));
    } else {
      Fail("'{}' has storage metadata of unknown kind: {}", fqn, pickle::Describe(*meta));
    }
  }

  for (const auto& [index, info] : storage.entries) {
    const std::string& fqn =
        pickle::AsString(RequireAttribute(*index, "fqn", "MetadataIndex"), "MetadataIndex.fqn");
    const Value* offset = pickle::FindAttribute(*index, "offset");
    if (offset == nullptr || offset->kind == Kind::kNone) {
      // BYTE_IO items have no offset; pickling drops the None field.
      auto location = ParseStorageInfo(*info, fmt::format("'{}'", fqn));
      if (!out.bytes_storage.emplace(fqn, std::move(location)).second) {
        Fail("two storage entries for item '{}'", fqn);
      }
      continue;
    }
    std::vector<int64_t> offsets =
        AsSize(*offset, fmt::format("MetadataIndex.offset of '{}'", fqn));
    auto location = ParseStorageInfo(*info, fmt::format("'{}' at {}", fqn, ShapeToString(offsets)));
    if (!out.tensor_storage.emplace(std::pair{fqn, std::move(offsets)}, std::move(location))
             .second) {
      Fail("two storage entries for '{}' at one offset", fqn);
    }
  }

  for (const auto& tensor : out.tensors) {
    for (const auto& chunk : tensor.chunks) out.Locate(tensor, chunk);
  }
  for (const auto& item : out.byte_items) {
    if (!out.bytes_storage.contains(item)) Fail("no storage entry for item '{}'", item);
  }
  return out;
}

DcpMetadata ReadDcpMetadata(const std::filesystem::path& metadata_file) {
  return WithContext([&] { return metadata_file.string(); },
                     [&] {
                       const ReadOnlyFile file = ReadOnlyFile::Open(metadata_file);
                       if (file.size() > kMaxMetadataBytes) {
                         Fail("{} bytes is more than the {} allowed for a .metadata file",
                              file.size(), kMaxMetadataBytes);
                       }
                       const std::vector<std::byte> bytes = file.Read(0, file.size());
                       return ParseDcpMetadata(bytes);
                     });
}

void ValidateChunkLayout(const TensorMeta& tensor) {
  const std::size_t rank = tensor.size.size();
  uint64_t covered = 0;
  for (std::size_t i = 0; i < tensor.chunks.size(); ++i) {
    const auto& a = tensor.chunks[i];
    covered = CheckedAdd(covered, CheckedNumel(a.sizes, "chunk size"), "chunk volume");
    for (std::size_t j = i + 1; j < tensor.chunks.size(); ++j) {
      const auto& b = tensor.chunks[j];
      bool overlap = true;
      for (std::size_t d = 0; d < rank && overlap; ++d) {
        overlap =
            a.offsets[d] < b.offsets[d] + b.sizes[d] && b.offsets[d] < a.offsets[d] + a.sizes[d];
      }
      if (overlap && CheckedNumel(a.sizes, "chunk") > 0 && CheckedNumel(b.sizes, "chunk") > 0) {
        Fail("'{}': chunks at {} and {} overlap", tensor.fqn, ShapeToString(a.offsets),
             ShapeToString(b.offsets));
      }
    }
  }
  const uint64_t numel = CheckedNumel(tensor.size, "global size");
  if (covered != numel) {
    Fail("'{}': chunks cover {} of its {} elements", tensor.fqn, covered, numel);
  }
}

}  // namespace adapter_job::checkpoint
