#include "hf_weights.h"

#include <algorithm>
#include <future>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"

namespace adapter_job::verify {

namespace fs = std::filesystem;

namespace {

// One thread reads a few GB/s out of the page cache; a large tensor is split among several.
void ReadInParallel(const ReadOnlyFile& file, uint64_t offset, std::span<std::byte> out) {
  constexpr uint64_t kMinPiece = 16ULL << 20;
  constexpr uint64_t kMaxThreads = 8;
  const uint64_t pieces = std::clamp<uint64_t>(out.size() / kMinPiece, 1, kMaxThreads);
  if (pieces == 1) return file.ReadExact(offset, out);
  const uint64_t step = (out.size() + pieces - 1) / pieces;
  std::vector<std::future<void>> reads;
  for (uint64_t start = 0; start < out.size(); start += step) {
    const auto piece = out.subspan(start, std::min(step, out.size() - start));
    reads.push_back(std::async(std::launch::async, [&file, offset, start, piece] {
      file.ReadExact(offset + start, piece);
    }));
  }
  for (auto& read : reads) read.get();  // rethrows a failed read
}

}  // namespace

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
  return HfWeights(safetensors::ModelWeights::Open(model_dir));
}

const safetensors::ModelWeights::Tensor& HfWeights::Entry(const std::string& name) const {
  const safetensors::ModelWeights::Tensor* tensor = weights_.Find(name);
  if (!tensor) Fail("the base model has no tensor '{}'", name);
  return *tensor;
}

at::Tensor HfWeights::Get(const std::string& name, const at::Device& device,
                          at::ScalarType dtype) const {
  const safetensors::ModelWeights::Tensor& tensor = Entry(name);
  const safetensors::TensorEntry& entry = tensor.entry;
  const at::ScalarType stored = ToTorch(entry.dtype);
  const ReadOnlyFile& file = weights_.FileOf(tensor);
  const uint64_t size = entry.end - entry.begin;
  if (device.is_cpu()) {
    at::Tensor host = at::empty(entry.shape, at::TensorOptions().dtype(stored));
    ReadInParallel(file, tensor.offset, {static_cast<std::byte*>(host.data_ptr()), size});
    return host.to(dtype);
  }
  // Across in the stored dtype, converted on the device (half the bytes of float32 for bf16).
  return CopyToDevice(file, tensor.offset, size, device).view(stored).view(entry.shape).to(dtype);
}

// Through two fixed pinned buffers, as bench/read_h2d_floor.py does: the next piece is read while
// the last one crosses. Pinning per tensor instead made an 8B pass 4.8x its floor on the GPU VM,
// where every fresh host page costs a fault into the hypervisor.
at::Tensor HfWeights::CopyToDevice(const ReadOnlyFile& file, uint64_t offset, uint64_t size,
                                   const at::Device& device) const {
  if (staging_.empty()) {
    for (int i = 0; i < 2; ++i)
      staging_.push_back(at::empty({static_cast<int64_t>(kStagingBytes)},
                                   at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
  }
  at::Tensor out =
      at::empty({static_cast<int64_t>(size)}, at::TensorOptions().dtype(at::kByte).device(device));
  const auto read_piece = [&](uint64_t start) {
    const uint64_t n = std::min(kStagingBytes, size - start);
    at::Tensor& buffer = staging_[(start / kStagingBytes) % 2];
    return std::async(std::launch::async, [&file, &buffer, offset, start, n] {
      ReadInParallel(file, offset + start, {static_cast<std::byte*>(buffer.data_ptr()), n});
    });
  };
  std::future<void> next = read_piece(0);
  for (uint64_t start = 0; start < size; start += kStagingBytes) {
    next.get();
    if (start + kStagingBytes < size) next = read_piece(start + kStagingBytes);
    const auto n = static_cast<int64_t>(std::min(kStagingBytes, size - start));
    // Synchronous: the buffer is free again for the piece after next.
    out.narrow(0, static_cast<int64_t>(start), n)
        .copy_(staging_[(start / kStagingBytes) % 2].narrow(0, 0, n), /*non_blocking=*/false);
  }
  return out;
}

}  // namespace adapter_job::verify
