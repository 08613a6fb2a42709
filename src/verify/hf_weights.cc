#include "hf_weights.h"

#include <algorithm>
#include <future>
#include <vector>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/tensor.h"

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

std::optional<HfWeights::Mxfp4Parts> HfWeights::Mxfp4(const std::string& name) const {
  if (weights_.Find(name)) return std::nullopt;
  const auto* blocks = weights_.Find(name + "_blocks");
  const auto* scales = weights_.Find(name + "_scales");
  if (!blocks || !scales) return std::nullopt;
  const auto& b = blocks->entry.shape;
  const auto& s = scales->entry.shape;
  if (blocks->entry.dtype != DType::kUInt8 || scales->entry.dtype != DType::kUInt8 ||
      b.size() < 3 || b.back() != 16 || !std::equal(s.begin(), s.end(), b.begin(), b.end() - 1) ||
      s.size() + 1 != b.size()) {
    Fail(
        "{}: '{}_blocks' {} {} and '{}_scales' {} {} are not MXFP4 (uint8 [..., out, in / 32, 16] "
        "and uint8 [..., out, in / 32])",
        weights_.PathOf(*blocks).string(), name, TorchName(blocks->entry.dtype), ShapeToString(b),
        name, TorchName(scales->entry.dtype), ShapeToString(s));
  }
  return Mxfp4Parts{blocks, scales};
}

std::vector<int64_t> HfWeights::Shape(const std::string& name) const {
  const auto mxfp4 = Mxfp4(name);
  if (!mxfp4) return Entry(name).entry.shape;
  // [..., out, groups, 16] holds [..., out, groups x 32]; transformers holds it as [..., in, out].
  std::vector<int64_t> shape(mxfp4->blocks->entry.shape.begin(),
                             mxfp4->blocks->entry.shape.end() - 2);
  const int64_t out = shape.back();
  shape.back() = mxfp4->blocks->entry.shape.end()[-2] * 32;
  shape.push_back(out);
  return shape;
}

at::Tensor HfWeights::Get(const std::string& name, const at::Device& device,
                          at::ScalarType dtype) const {
  if (const auto mxfp4 = Mxfp4(name)) {
    // Two FP4 (e2m1) values a byte, the low nibble first, each 32 of them scaled by 2^(e - 127).
    static const float kFp4[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    const at::Tensor lut = at::tensor(at::ArrayRef<float>(kFp4, 16)).to(device);
    const at::Tensor blocks = Raw(*mxfp4->blocks, device);
    const at::Tensor scales = Raw(*mxfp4->scales, device);
    const std::vector<int64_t> shape = Shape(name);
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dtype).device(device));
    // One expert (slice of the leading dimension) at a time: the indices are 4 bytes a value.
    for (int64_t i = 0; i < blocks.size(0); ++i) {
      const at::Tensor bytes = blocks[i].to(at::kInt);
      const at::Tensor values =
          at::stack({lut.index({bytes.bitwise_and(15)}), lut.index({bytes.bitwise_right_shift(4)})},
                    -1)
              .flatten(-2);  // [..., out, groups, 32]
      const at::Tensor exponents = scales[i].to(at::kInt).sub(127).unsqueeze(-1);
      out[i].copy_(at::ldexp(values, exponents).flatten(-2).transpose(-2, -1));
    }
    return out;
  }
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

at::Tensor HfWeights::Raw(const safetensors::ModelWeights::Tensor& tensor,
                          const at::Device& device) const {
  const at::ScalarType stored = ToTorch(tensor.entry.dtype);
  const uint64_t size = tensor.entry.end - tensor.entry.begin;
  if (device.is_cpu()) {
    at::Tensor host = at::empty(tensor.entry.shape, at::TensorOptions().dtype(stored));
    ReadInParallel(weights_.FileOf(tensor), tensor.offset,
                   {static_cast<std::byte*>(host.data_ptr()), size});
    return host;
  }
  return CopyToDevice(weights_.FileOf(tensor), tensor.offset, size, device)
      .view(stored)
      .view(tensor.entry.shape);
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
