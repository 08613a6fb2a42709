// The tensor reduction is `torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
// stride, requires_grad, backward_hooks[, metadata])`, or `_rebuild_tensor_v3(..., dtype[,
// metadata])` for dtypes without a legacy storage class; the storage is the persistent id
// ('storage', storage_type, key, location, numel) resolved to member `data/<key>`
// (torch/serialization.py, torch/_utils.py).
#include "adapter_job/checkpoint/torch_save.h"

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"

namespace adapter_job::checkpoint {
namespace {

using pickle::Kind;
using pickle::Value;

constexpr std::string_view kDataPkl = "data.pkl";

DType DTypeOfGlobal(const Value& value, std::string_view what) {
  if (value.kind == Kind::kGlobal && value.text == "torch") {
    if (auto dtype = DTypeFromTorchName(value.name)) return *dtype;
  }
  Fail("{} is not a known torch dtype: {}", what, pickle::Describe(value));
}

struct Storage {
  std::span<const std::byte> bytes;
  std::optional<DType> dtype;  // none for UntypedStorage (v3 passes the dtype separately)
};

Storage ResolveStorage(const TorchSaveArchive& archive, const Value& persistent_id) {
  if (persistent_id.kind != Kind::kPersistentId || persistent_id.state == nullptr) {
    Fail("tensor storage is not a persistent id: {}", pickle::Describe(persistent_id));
  }
  const auto& pid = pickle::AsSequence(*persistent_id.state, "storage persistent id");
  if (pid.size() != 5 || pid[0]->kind != Kind::kString || pid[0]->text != "storage") {
    Fail("storage persistent id should be ('storage', type, key, location, numel), found {}",
         pickle::Describe(*persistent_id.state));
  }
  const Value& type = *pid[1];
  const std::string& key = pickle::AsString(*pid[2], "storage key");
  const int64_t numel = pickle::AsInt(*pid[4], "storage numel");
  if (numel < 0) Fail("storage '{}' has negative size {}", key, numel);

  Storage storage;
  std::size_t item_size = 1;
  if (type.kind == Kind::kGlobal && type.name == "UntypedStorage") {
    item_size = 1;  // numel counts bytes
  } else if (type.kind == Kind::kGlobal && type.text == "torch") {
    storage.dtype = DTypeFromStorageClass(type.name);
    if (!storage.dtype) Fail("unknown storage class torch.{}", type.name);
    item_size = ItemSize(*storage.dtype);
  } else {
    Fail("unknown storage type {}", pickle::Describe(type));
  }
  const std::string member_name = archive.prefix + "/data/" + key;
  const ZipMember* member = archive.zip.Find(member_name);
  if (member == nullptr) Fail("storage member '{}' is missing from the archive", member_name);
  const uint64_t bytes = CheckedMul(static_cast<uint64_t>(numel), item_size, "storage size");
  if (member->size < bytes) {
    Fail("storage member '{}' holds {} bytes, but its {} elements need {}", member_name,
         member->size, numel, bytes);
  }
  storage.bytes = archive.zip.Data(*member).first(bytes);
  return storage;
}

}  // namespace

TorchSaveArchive OpenTorchSave(std::span<const std::byte> bytes) {
  TorchSaveArchive archive{ZipArchive::Parse(bytes), {}, {}, false};
  const ZipMember* data_pkl = nullptr;
  for (const auto& member : archive.zip.members()) {
    const auto slash = member.name.find('/');
    if (slash != std::string::npos && member.name.substr(slash + 1) == kDataPkl) {
      if (data_pkl != nullptr) Fail("torch.save archive has two data.pkl members");
      data_pkl = &member;
      archive.prefix = member.name.substr(0, slash);
    }
  }
  if (data_pkl == nullptr) Fail("zip archive has no '<prefix>/data.pkl': not a torch.save file");
  if (const ZipMember* order = archive.zip.Find(archive.prefix + "/byteorder")) {
    const auto data = archive.zip.Data(*order);
    const std::string_view text(reinterpret_cast<const char*>(data.data()), data.size());
    if (text == "big") {
      archive.big_endian = true;
    } else if (text != "little") {
      Fail("byteorder member says '{}', expected 'little' or 'big'", text);
    }
  }
  archive.pickle = WithContext([&] { return std::string("data.pkl"); },
                               [&] { return pickle::Unpickle(archive.zip.Data(*data_pkl)); });
  return archive;
}

DecodedTensor DecodeTorchSaveTensor(const TorchSaveArchive& archive) {
  const Value* root = &archive.pickle.root();
  if (root->IsInstanceOf("torch._utils", "_rebuild_parameter") ||
      root->IsInstanceOf("torch._utils", "_rebuild_parameter_with_state")) {
    const auto& args = pickle::AsSequence(*root->args, "_rebuild_parameter arguments");
    if (args.empty()) Fail("_rebuild_parameter without arguments");
    root = args[0];
  }
  const bool v2 = root->IsInstanceOf("torch._utils", "_rebuild_tensor_v2");
  const bool v3 = root->IsInstanceOf("torch._utils", "_rebuild_tensor_v3");
  if (!v2 && !v3) {
    Fail("data.pkl does not hold a plain tensor (_rebuild_tensor_v2/v3) but {}",
         pickle::Describe(*root));
  }
  const auto& args = root->args->items;
  if (args.size() < (v3 ? 7u : 6u)) {
    Fail("{} has {} arguments, expected at least {}",
         v3 ? "_rebuild_tensor_v3" : "_rebuild_tensor_v2", args.size(), v3 ? 7 : 6);
  }
  const Storage storage = ResolveStorage(archive, *args[0]);
  const int64_t storage_offset = pickle::AsInt(*args[1], "storage_offset");
  std::vector<int64_t> shape = pickle::AsIntSequence(*args[2], "size");
  std::vector<int64_t> strides = pickle::AsIntSequence(*args[3], "stride");

  DType dtype;
  if (v3) {
    dtype = DTypeOfGlobal(*args[6], "_rebuild_tensor_v3 dtype");
  } else {
    if (!storage.dtype) Fail("_rebuild_tensor_v2 with an untyped storage");
    dtype = *storage.dtype;
  }
  if (shape.size() != strides.size()) {
    Fail("size {} and stride {} differ in rank", ShapeToString(shape), ShapeToString(strides));
  }
  const std::size_t item = ItemSize(dtype);
  if (storage.bytes.size() % item != 0) {
    Fail("storage of {} bytes is not a whole number of {} elements", storage.bytes.size(),
         TorchName(dtype));
  }
  const uint64_t storage_numel = storage.bytes.size() / item;
  if (storage_offset < 0) Fail("negative storage_offset {}", storage_offset);

  // torch's DCP writer clones every CPU tensor whose storage is not exactly its own size
  // (torch/distributed/checkpoint/filesystem.py's loaders: `if tensor.untyped_storage().size()
  // != tensor.nbytes: tensor = tensor.clone()`; GPU tensors are copied out by .to("cpu")), so a
  // chunk never needs more elements than its storage holds. A view that repeats elements
  // (stride 0) would let a few stored bytes expand into gigabytes of output.
  const uint64_t numel = CheckedNumel(shape, "tensor size");
  if (numel > 0 && (static_cast<uint64_t>(storage_offset) > storage_numel ||
                    numel > storage_numel - static_cast<uint64_t>(storage_offset))) {
    Fail(
        "tensor of size {} stride {} has {} elements, but its storage holds {} from offset {}: a "
        "checkpoint chunk's storage holds at least its own elements",
        ShapeToString(shape), ShapeToString(strides), numel, storage_numel, storage_offset);
  }
  // The furthest element the view touches must lie inside the storage.
  if (numel > 0) {
    uint64_t last = static_cast<uint64_t>(storage_offset);
    for (std::size_t d = 0; d < shape.size(); ++d) {
      if (strides[d] < 0) Fail("negative stride {} in dimension {}", strides[d], d);
      last = CheckedAdd(last,
                        CheckedMul(static_cast<uint64_t>(shape[d] - 1),
                                   static_cast<uint64_t>(strides[d]), "tensor extent"),
                        "tensor extent");
    }
    if (last >= storage_numel) {
      Fail(
          "tensor of size {} stride {} at storage offset {} reaches element {} of a {}-element "
          "storage",
          ShapeToString(shape), ShapeToString(strides), storage_offset, last, storage_numel);
    }
  }
  DecodedTensor out;
  out.big_endian = archive.big_endian;
  out.view.dtype = dtype;
  out.view.shape = std::move(shape);
  out.view.strides = std::move(strides);
  out.view.base =
      storage.bytes.data() + (numel > 0 ? storage_offset * static_cast<int64_t>(item) : 0);
  return out;
}

Tensor ReadTorchSaveTensor(std::span<const std::byte> bytes) {
  const TorchSaveArchive archive = OpenTorchSave(bytes);
  const DecodedTensor decoded = DecodeTorchSaveTensor(archive);
  Tensor tensor = ToContiguous(decoded.view);
  if (decoded.big_endian) SwapByteOrder(tensor);
  return tensor;
}

}  // namespace adapter_job::checkpoint
