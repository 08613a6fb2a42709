#include "adapter_job/checkpoint/dcp_metadata.h"

#include <algorithm>
#include <numeric>
#include <optional>
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

// bench/metadata_size.py measures the .metadata of a DeepSeek-V3-sized LoRA (61 layers, 256
// experts with shared adapters, PP16 x EP64) at 19 MB (~400 MB to parse), and 152 MB (3.3 GB) at
// ETP 8. Every rank parses it, at up to ~50 bytes of memory per byte for a hostile stream (see
// pickle.cc), so the cap sits above those, not at the 4 GiB it was.
constexpr std::size_t kMaxMetadataBytes = std::size_t{256} << 20;

// Real adapters split at most three dimensions (layer, expert, TP or swiglu half: a
// DeepSeek-V3-style [L, E, 2F, r] expert fc1); the corner count below doubles with each.
constexpr std::size_t kMaxSplitDims = 8;
// Chunk corners held at once by the tiling check (8k + 5 bytes each for k split dimensions: at
// most ~600 MB): a DeepSeek-V3 expert fc1 adapter with shared experts has 61 layers x 256 experts x
// 2 swiglu halves x ETP chunks, 2M corners at ETP 8.
constexpr uint64_t kMaxChunkCorners = uint64_t{1} << 23;
// The pairwise search that names two overlapping chunks in the error (~kMaxChunksToName^2 / 2).
constexpr std::size_t kMaxChunksToName = 4096;

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

// Whether the non-empty `chunks` (inside the tensor, as ParseTensor checks) cover each element of
// it exactly once, in O(n 2^k log n) for k split dimensions, where a pairwise test is O(n^2)
// (60k chunks took 16 s). The signed corners of a box [a, b) (+1 where an even number of
// coordinates come from b, -1 where odd) are the mixed finite difference of its indicator; that
// difference is linear and determines a function of finite support, so the chunks tile the
// tensor iff their signed corners, summed per point, equal the tensor's own.
bool TilesExactly(const TensorMeta& tensor, std::span<const ChunkMeta* const> chunks) {
  // Dimensions every chunk spans whole change nothing: leave them out.
  std::vector<std::size_t> dims;
  for (std::size_t d = 0; d < tensor.size.size(); ++d) {
    const bool split = std::any_of(chunks.begin(), chunks.end(), [&](const ChunkMeta* c) {
      return c->offsets[d] != 0 || c->sizes[d] != tensor.size[d];
    });
    if (split) dims.push_back(d);
  }
  const std::size_t k = dims.size();
  if (k > kMaxSplitDims) {
    Fail("'{}': its chunks split {} dimensions; at most {} are supported", tensor.fqn, k,
         kMaxSplitDims);
  }
  const uint64_t corners = uint64_t{1} << k;
  if (chunks.size() + 1 > kMaxChunkCorners / corners) {
    Fail("'{}': {} chunks split over {} dimensions are more than the {} corners supported",
         tensor.fqn, chunks.size(), k, kMaxChunkCorners);
  }
  const std::size_t count = (chunks.size() + 1) * corners;
  std::vector<int64_t> points(count * k);
  std::vector<int8_t> signs(count);
  std::size_t at = 0;
  const auto add_box = [&](std::span<const int64_t> offsets, std::span<const int64_t> sizes,
                           int8_t sign) {
    for (uint64_t mask = 0; mask < corners; ++mask, ++at) {
      int8_t s = sign;
      for (std::size_t j = 0; j < k; ++j) {
        const bool upper = ((mask >> j) & 1) != 0;
        points[at * k + j] = offsets[dims[j]] + (upper ? sizes[dims[j]] : 0);
        if (upper) s = static_cast<int8_t>(-s);
      }
      signs[at] = s;
    }
  };
  for (const ChunkMeta* c : chunks) add_box(c->offsets, c->sizes, 1);
  const std::vector<int64_t> origin(tensor.size.size(), 0);
  add_box(origin, tensor.size, -1);

  std::vector<uint32_t> order(count);
  std::iota(order.begin(), order.end(), 0u);
  const auto point = [&](uint32_t i) { return std::span(points).subspan(std::size_t{i} * k, k); };
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return std::ranges::lexicographical_compare(point(a), point(b));
  });
  for (std::size_t i = 0; i < count;) {
    int64_t sum = 0;
    std::size_t j = i;
    for (; j < count && std::ranges::equal(point(order[i]), point(order[j])); ++j) {
      sum += signs[order[j]];
    }
    if (sum != 0) return false;
    i = j;
  }
  return true;
}

// Two chunks that overlap, to name them in the error; a pairwise search, so only for few chunks.
std::optional<std::pair<const ChunkMeta*, const ChunkMeta*>> FindOverlap(
    std::span<const ChunkMeta* const> chunks) {
  if (chunks.size() > kMaxChunksToName) return std::nullopt;
  for (std::size_t i = 0; i < chunks.size(); ++i) {
    for (std::size_t j = i + 1; j < chunks.size(); ++j) {
      const ChunkMeta& a = *chunks[i];
      const ChunkMeta& b = *chunks[j];
      bool overlap = true;
      for (std::size_t d = 0; d < a.offsets.size() && overlap; ++d) {
        overlap =
            a.offsets[d] < b.offsets[d] + b.sizes[d] && b.offsets[d] < a.offsets[d] + a.sizes[d];
      }
      if (overlap) return std::pair{&a, &b};
    }
  }
  return std::nullopt;
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
  const uint64_t numel = CheckedNumel(tensor.size, "global size");
  uint64_t covered = 0;
  std::vector<const ChunkMeta*> chunks;  // the non-empty ones
  for (const auto& chunk : tensor.chunks) {
    if (chunk.offsets.size() != tensor.size.size() || chunk.sizes.size() != tensor.size.size()) {
      Fail("'{}': chunk at {} of size {} does not match the rank of global size {}", tensor.fqn,
           ShapeToString(chunk.offsets), ShapeToString(chunk.sizes), ShapeToString(tensor.size));
    }
    const uint64_t volume = CheckedNumel(chunk.sizes, "chunk size");
    covered = CheckedAdd(covered, volume, "chunk volume");
    if (volume > 0) chunks.push_back(&chunk);
  }
  if (covered > numel || (covered == numel && numel > 0 && !TilesExactly(tensor, chunks))) {
    const auto pair = FindOverlap(chunks);
    if (pair) {
      Fail("'{}': chunks at {} and {} overlap", tensor.fqn, ShapeToString(pair->first->offsets),
           ShapeToString(pair->second->offsets));
    }
    Fail("'{}': its {} chunks overlap: they hold {} elements of its {}, but not each one once",
         tensor.fqn, chunks.size(), covered, numel);
  }
  if (covered != numel) {
    Fail("'{}': chunks cover {} of its {} elements", tensor.fqn, covered, numel);
  }
}

}  // namespace adapter_job::checkpoint
