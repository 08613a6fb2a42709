#include "hf_weights.h"

#include <nlohmann/json.hpp>
#include <set>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::verify {

namespace fs = std::filesystem;

at::ScalarType ToTorch(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return at::kFloat;
    case DType::kBFloat16:
      return at::kBFloat16;
    case DType::kFloat16:
      return at::kHalf;
    case DType::kFloat64:
      return at::kDouble;
    case DType::kInt64:
      return at::kLong;
    case DType::kInt32:
      return at::kInt;
    case DType::kInt8:
      return at::kChar;
    case DType::kUInt8:
      return at::kByte;
    case DType::kBool:
      return at::kBool;
    default:
      Fail("tensors of dtype {} cannot be used for verification", TorchName(dtype));
  }
}

HfWeights HfWeights::Open(const fs::path& model_dir) {
  HfWeights weights;
  std::vector<fs::path> shards;
  const fs::path index = model_dir / "model.safetensors.index.json";
  if (fs::exists(model_dir / "model.safetensors")) {
    shards.push_back(model_dir / "model.safetensors");
  } else if (fs::exists(index)) {
    WithContext(
        [&] { return index.string(); },
        [&] {
          nlohmann::json j;
          try {
            j = nlohmann::json::parse(ReadTextFile(index));
          } catch (const nlohmann::json::exception& e) {
            Fail("not valid JSON: {}", e.what());
          }
          if (!j.contains("weight_map") || !j["weight_map"].is_object())
            Fail("no 'weight_map' object");
          std::set<std::string> names;
          for (const auto& [tensor, file] : j["weight_map"].items()) {
            if (!file.is_string()) Fail("weight_map['{}'] is not a file name", tensor);
            names.insert(file.get<std::string>());
          }
          for (const auto& name : names) {
            if (name.find('/') != std::string::npos || name.find("..") != std::string::npos) {
              Fail("shard name '{}' is not a plain file name", name);
            }
            shards.push_back(model_dir / name);
          }
        });
  } else {
    Fail("'{}' has neither model.safetensors nor model.safetensors.index.json", model_dir.string());
  }
  for (const auto& shard : shards) {
    weights.files_.push_back(std::make_unique<safetensors::File>(safetensors::File::Open(shard)));
    const safetensors::File* file = weights.files_.back().get();
    for (const auto& entry : file->header().tensors) {
      if (!weights.location_.emplace(entry.name, std::pair{file, &entry}).second) {
        Fail("tensor '{}' appears in two shards of '{}'", entry.name, model_dir.string());
      }
    }
  }
  return weights;
}

std::vector<int64_t> HfWeights::Shape(const std::string& name) const {
  const auto it = location_.find(name);
  if (it == location_.end()) Fail("the base model has no tensor '{}'", name);
  return it->second.second->shape;
}

at::Tensor HfWeights::Get(const std::string& name, const at::Device& device,
                          at::ScalarType dtype) const {
  const auto it = location_.find(name);
  if (it == location_.end()) Fail("the base model has no tensor '{}'", name);
  const auto& [file, entry] = it->second;
  const auto bytes = file->Data(*entry);
  // from_blob over the read-only mapping; .to() makes the copy before anything could write.
  const at::Tensor view = at::from_blob(const_cast<std::byte*>(bytes.data()), entry->shape,
                                        at::TensorOptions().dtype(ToTorch(entry->dtype)));
  // On a device: across in the stored dtype, converted there. ATen would otherwise convert on the
  // host first and move float32, twice the bytes of bf16.
  at::Tensor copy = device.is_cpu()
                        ? view.to(dtype, /*non_blocking=*/false, /*copy=*/true)
                        : view.to(device, view.scalar_type(), /*non_blocking=*/false, /*copy=*/true)
                              .to(dtype);
  // Each weight is read once: its pages need not stay mapped (the process would otherwise
  // grow to the size of the model).
  file->Release(*entry);
  return copy;
}

}  // namespace adapter_job::verify
