#include "rank_share.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <optional>

#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "device_merge.h"

namespace adapter_job::merge {
namespace {

namespace fs = std::filesystem;

// Input bytes per block: large enough that a read or write is one long sequential request,
// small enough that three blocks are nothing beside a layer.
constexpr uint64_t kBlockBytes = 32ull << 20;

// A run of whole rows of one output tensor, seen as [rows, cols] (a vector is one row).
struct Block {
  const OutputTensor* tensor = nullptr;
  int64_t first_row = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  std::span<std::byte> in;   // as read
  std::span<std::byte> out;  // as written; empty when the bytes are written as read

  uint64_t in_bytes() const { return rows * cols * ItemSize(tensor->base->entry.dtype); }
  uint64_t out_bytes() const { return rows * cols * ItemSize(tensor->dtype); }
  bool converted() const { return tensor->module || tensor->dtype != tensor->base->entry.dtype; }
};

// Buffers allocated once and never zeroed: fresh pages for every block (page faults, zeroing)
// cost more system time than the reads and writes themselves.
struct Buffers {
  static constexpr int kIn = 3;   // being read, being merged, being written
  static constexpr int kOut = 2;  // being merged, being written
  HostBuffer in[kIn], out[kOut];
};

std::vector<Block> BlocksOf(const MergedLayout& layout, int rank) {
  std::vector<Block> blocks;
  for (const OutputTensor& t : layout.tensors) {
    if (t.rank != rank || t.nbytes == 0) continue;
    // Rows over all dimensions but the last: a fused expert parameter [experts, in, out] merges
    // row by row like a matrix.
    int64_t rows = 1;
    for (std::size_t d = 0; d + 1 < t.shape.size(); ++d) rows *= t.shape[d];
    const int64_t cols = static_cast<int64_t>(t.nbytes / ItemSize(t.dtype)) / rows;
    const uint64_t row_bytes = cols * std::max<uint64_t>(ItemSize(t.base->entry.dtype), 4);
    const int64_t per_block = std::max<int64_t>(1, static_cast<int64_t>(kBlockBytes / row_bytes));
    for (int64_t first = 0; first < rows; first += per_block)
      blocks.push_back({&t, first, std::min(per_block, rows - first), cols, {}, {}});
  }
  return blocks;
}

// Test hook for fault tests: ADAPTER_JOB_TEST_KILL_RANK=<rank>:merge makes that rank die by
// SIGKILL once its first block is written, as a node failure would (comm/layer_gather.cc reads
// <rank>:<layer> for the gather).
bool KilledWhileMerging(int rank) {
  const char* spec = std::getenv("ADAPTER_JOB_TEST_KILL_RANK");
  return spec != nullptr && std::string_view(spec) == fmt::format("{}:merge", rank);
}

}  // namespace

// Writes go to the kernel 1 MiB at a time: one pwrite of a 32 MiB block spent three times as
// long copying into the page cache (copy_folio_from_iter_atomic: 52% of a merge's time, measured
// with perf on the 1B shape: 6.5 s, against 2.3 s in 1 MiB pieces).
constexpr std::size_t kWriteBytes = 1 << 20;

void WriteAllAt(int fd, uint64_t offset, std::span<const std::byte> bytes, const fs::path& path) {
  while (!bytes.empty()) {
    const ssize_t n = ::pwrite(fd, bytes.data(), std::min<std::size_t>(bytes.size(), kWriteBytes),
                               static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) Fail<IoError>("cannot write '{}': {}", path.string(), std::strerror(errno));
    bytes = bytes.subspan(n);
    offset += n;
  }
}

writer::SinkStats WriteShare(const ShareInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  // Every module this rank merges is checked before a byte is written.
  for (const OutputTensor& t : in.layout.tensors) {
    if (t.rank == in.rank && t.module) in.adapter.Check(t);
  }
  std::vector<Block> blocks = BlocksOf(in.layout, in.rank);
  std::map<std::size_t, UniqueFd> files;
  for (const Block& b : blocks) {
    const std::size_t shard = b.tensor->shard;
    if (files.count(shard)) continue;
    const fs::path path = in.staging / in.layout.shards[shard].file;
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CLOEXEC));
    if (!fd.valid()) Fail<IoError>("cannot open '{}': {}", path.string(), std::strerror(errno));
    files.emplace(shard, std::move(fd));
  }

  // Block k reads into in[k % 3] and merges into out[k % 2]: when block k + 1 is read, block
  // k - 2 (the last user of its buffer) has been written, as block k - 1 is only written after.
  uint64_t in_max = 0, out_max = 0;
  for (const Block& b : blocks) {
    in_max = std::max(in_max, b.in_bytes());
    if (b.converted()) out_max = std::max(out_max, b.out_bytes());
  }
  std::optional<DeviceMerger> gpu;
  if (in.gpu >= 0) gpu.emplace(in.gpu);
  const auto allocate = [&](uint64_t bytes) {
    return gpu ? gpu->AllocateHost(bytes) : HostBuffer(new std::byte[bytes], HostBufferDeleter{});
  };
  Buffers buffers;
  for (auto& buffer : buffers.in) buffer = allocate(in_max);
  for (auto& buffer : buffers.out) buffer = allocate(out_max);

  const auto read = [&](Block b, std::size_t k) {
    b.in = {buffers.in[k % Buffers::kIn].get(), b.in_bytes()};
    in.base.Read(*b.tensor->base, b.first_row * b.cols * ItemSize(b.tensor->base->entry.dtype),
                 b.in);
    return b;
  };
  const auto write = [&](const Block& b) {
    const std::span<const std::byte> bytes = b.out.empty() ? b.in : b.out;
    const uint64_t at = b.tensor->offset + b.first_row * b.cols * ItemSize(b.tensor->dtype);
    WriteAllAt(files.at(b.tensor->shard).get(), at, bytes,
               in.staging / in.layout.shards[b.tensor->shard].file);
  };

  writer::SinkStats stats;
  stats.gpu = in.gpu;
  std::unique_ptr<LowRankUpdate> update;  // of the tensor being merged
  const OutputTensor* updated = nullptr;
  uint64_t tensors_done = 0, tensors_total = 0;
  for (const OutputTensor& t : in.layout.tensors) tensors_total += t.rank == in.rank;
  std::future<Block> next;
  std::future<void> writing;
  if (!blocks.empty()) next = std::async(std::launch::async, read, blocks[0], 0);
  for (std::size_t k = 0; k < blocks.size(); ++k) {
    Block b = next.get();
    if (k + 1 < blocks.size()) next = std::async(std::launch::async, read, blocks[k + 1], k + 1);
    const OutputTensor& t = *b.tensor;
    if (b.converted()) {
      if (t.module && updated != &t) {
        update = std::make_unique<LowRankUpdate>(in.adapter.Update(t));
        updated = &t;
        if (gpu && update->rows_per_expert == 0) gpu->Load(*update);
      }
      b.out = {buffers.out[k % Buffers::kOut].get(), b.out_bytes()};
      // The device kernels take one [rank, in] lora_A; fused experts merge on the CPU, with the
      // same arithmetic, so the bytes are the same.
      if (gpu && !(t.module && update->rows_per_expert > 0)) {
        gpu->MergeRows(b.in, t.base->entry.dtype, b.out, t.dtype, b.first_row, b.rows, b.cols,
                       t.module.has_value());
      } else {
        MergeRows(b.in, t.base->entry.dtype, b.out, t.dtype, b.first_row, b.rows, b.cols,
                  t.module ? update.get() : nullptr, in.threads);
      }
    }
    stats.bytes_written += b.out.empty() ? b.in.size() : b.out.size();
    if (writing.valid()) {
      writing.get();
      if (k == 1 && KilledWhileMerging(in.rank)) std::raise(SIGKILL);
    }
    writing = std::async(std::launch::async, write, b);
    const bool last_of_tensor = k + 1 == blocks.size() || blocks[k + 1].tensor != &t;
    if (last_of_tensor && in.progress)
      in.progress({"merge", ++tensors_done, tensors_total, 0, tensors_done, stats.bytes_written,
                   "tensors"});
  }
  if (writing.valid()) writing.get();
  for (auto& [shard, fd] : files) {
    const fs::path path = in.staging / in.layout.shards[shard].file;
    if (::fsync(fd.get()) != 0)
      Fail<IoError>("cannot flush '{}': {}", path.string(), std::strerror(errno));
    fd.Close(path);
  }
  stats.bytes_read = in.base.bytes_read();
  if (gpu) stats.gpu_bytes = gpu->device_bytes();
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

}  // namespace adapter_job::merge
