// The merge on a GPU (src/merge/device_merge.h) writes exactly the bytes the CPU merge writes
// (merge_math.h), for every dtype pair, LoRA and DoRA, rows that are not a multiple of the
// norm's lanes, blocks that start mid-tensor, real hidden sizes, and NaN, infinity, subnormal and
// overflowing values. Without a GPU every case skips (ctest shows them skipped, label gpu).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "adapter_job/comm/accelerator.h"
#include "adapter_job/merge/merge_math.h"
#include "merge/device_merge.h"

namespace adapter_job::merge {
namespace {

struct Case {
  DType in, out;
  bool lora, dora;
  int64_t rows, cols, rank, first_row;
};

std::string Name(const Case& c) {
  return fmt::format("{} to {}, {}, {}x{} rows from {}, rank {}", TorchName(c.in), TorchName(c.out),
                     c.dora   ? "DoRA"
                     : c.lora ? "LoRA"
                              : "no update",
                     c.rows, c.cols, c.first_row, c.rank);
}

std::vector<float> Random(std::size_t n, float sigma, std::mt19937& gen) {
  std::normal_distribution<float> dist(0, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// The tensor's rows as stored in `dtype`, with the values rounding gets wrong first.
std::vector<std::byte> Weights(const Case& c, std::mt19937& gen) {
  std::vector<float> w = Random(c.rows * c.cols, 0.02f, gen);
  const float special[] = {std::numeric_limits<float>::quiet_NaN(),
                           -std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::infinity(),
                           1e-40f,        // float32 subnormal
                           3e-6f,         // float16 subnormal
                           65519.f,       // the largest that rounds to a finite float16
                           65520.f,       // rounds to float16 infinity
                           1.00390625f};  // half-way between two bfloat16s: ties to even
  // In the last row only, so that DoRA's other rows keep finite norms.
  for (std::size_t i = 0; i < std::size(special) && i < static_cast<std::size_t>(c.cols); ++i)
    w[(c.rows - 1) * c.cols + i] = special[i];
  std::vector<std::byte> stored(w.size() * ItemSize(c.in));
  MergeRows(std::as_bytes(std::span(w)), DType::kFloat32, stored, c.in, 0, c.rows, c.cols, nullptr,
            1);
  return stored;
}

// The bytes the GPU writes for `c` against the CPU's.
void ExpectSameBytes(const Case& c, DeviceMerger& merger) {
  SCOPED_TRACE(Name(c));
  std::mt19937 gen(11);
  const std::vector<std::byte> in = Weights(c, gen);
  LowRankUpdate u;
  const int64_t out_features = c.first_row + c.rows;
  u.rank = c.rank;
  u.a = Random(c.rank * c.cols, 1.0f / std::sqrt(static_cast<float>(c.cols)), gen);
  u.b = Random(out_features * c.rank, 0.01f, gen);
  u.scale = 32.0 / static_cast<double>(c.rank);
  if (c.dora) u.magnitude = Random(out_features, 1.0f, gen);

  const std::size_t out_bytes = c.rows * c.cols * ItemSize(c.out);
  std::vector<std::byte> cpu(out_bytes), gpu(out_bytes, std::byte{0x55});
  MergeRows(in, c.in, cpu, c.out, c.first_row, c.rows, c.cols, c.lora ? &u : nullptr, 4);
  if (c.lora) merger.Load(u);
  merger.MergeRows(in, c.in, gpu, c.out, c.first_row, c.rows, c.cols, c.lora);

  std::size_t differing = 0, first = out_bytes;
  for (std::size_t i = 0; i < out_bytes; ++i) {
    if (cpu[i] == gpu[i]) continue;
    ++differing;
    first = std::min(first, i);
  }
  EXPECT_EQ(differing, 0u) << "first differing byte " << first << " of " << out_bytes << " on "
                           << merger.name();
}

class DeviceMerge : public ::testing::Test {
 protected:
  void SetUp() override {
    const comm::AcceleratorInfo info = comm::ProbeAccelerators();
    if (!DeviceMergeBuilt() || info.device_count == 0)
      GTEST_SKIP() << "GPU tests not run: no CUDA GPU (" << info.unavailable_reason << ")";
  }
};

// The hidden sizes of real models (2048 to 8192), narrow and odd ones, DoRA with rows longer and
// shorter than its 256 lanes, and a block starting mid-tensor as the rank's pipeline cuts them.
const Case kCases[] = {
    {DType::kBFloat16, DType::kBFloat16, true, false, 64, 4096, 16, 0},
    {DType::kBFloat16, DType::kBFloat16, true, true, 48, 8192, 64, 1000},
    {DType::kBFloat16, DType::kBFloat16, true, true, 33, 2048, 16, 7},
    {DType::kBFloat16, DType::kFloat32, true, true, 5, 257, 8, 0},
    {DType::kFloat32, DType::kBFloat16, true, false, 17, 255, 4, 3},
    {DType::kFloat32, DType::kFloat32, true, true, 9, 100, 1, 0},
    {DType::kFloat16, DType::kFloat16, true, true, 12, 1000, 16, 2},
    {DType::kFloat16, DType::kFloat16, true, false, 12, 3000, 32, 0},
    {DType::kFloat32, DType::kFloat16, false, false, 4, 777, 1, 0},
    {DType::kBFloat16, DType::kFloat32, false, false, 2, 8, 1, 0},
    {DType::kBFloat16, DType::kBFloat16, true, false, 4096, 64, 16, 128},
};

// One test looping over the cases rather than a parameterised suite: CMake 4's test discovery
// cannot read the parameter values gtest lists beside the names.
TEST_F(DeviceMerge, WritesTheCpuMergesBytes) {
  DeviceMerger merger(0);
  for (const Case& c : kCases) ExpectSameBytes(c, merger);
}

// One merger for a whole tensor in blocks, with another tensor's update loaded between: what a
// rank's pipeline does.
TEST_F(DeviceMerge, ReloadsTheUpdateBetweenTensors) {
  std::mt19937 gen(5);
  const int64_t rows = 40, cols = 512;
  DeviceMerger merger(0);
  for (const bool dora : {true, false}) {
    LowRankUpdate u;
    u.rank = 8;
    u.a = Random(u.rank * cols, 0.05f, gen);
    u.b = Random(rows * u.rank, 0.01f, gen);
    u.scale = 2;
    if (dora) u.magnitude = Random(rows, 1.0f, gen);
    std::vector<float> w = Random(rows * cols, 0.02f, gen);
    const auto in = std::as_bytes(std::span(w));
    std::vector<std::byte> cpu(in.size()), gpu(in.size());
    MergeRows(in, DType::kFloat32, cpu, DType::kFloat32, 0, rows, cols, &u, 2);
    merger.Load(u);
    const std::size_t half = (rows / 2) * cols * 4;
    merger.MergeRows(in.first(half), DType::kFloat32, std::span(gpu).first(half), DType::kFloat32,
                     0, rows / 2, cols, true);
    merger.MergeRows(in.subspan(half), DType::kFloat32, std::span(gpu).subspan(half),
                     DType::kFloat32, rows / 2, rows - rows / 2, cols, true);
    EXPECT_EQ(cpu, gpu) << (dora ? "DoRA" : "LoRA");
  }
}

}  // namespace
}  // namespace adapter_job::merge
