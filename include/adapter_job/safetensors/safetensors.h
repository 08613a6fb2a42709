// safetensors (huggingface/safetensors): u64 little-endian header length N, N bytes of JSON
// header padded with spaces, then the tensors back to back with no gaps.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "adapter_job/core/dtype.h"
#include "adapter_job/core/file.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::safetensors {

// The reference reader's limit (safetensors/src/tensor.rs MAX_HEADER_SIZE).
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct TensorEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data section
  uint64_t end = 0;
};

struct Header {
  std::vector<TensorEntry> tensors;  // in header order
  std::optional<std::map<std::string, std::string>> metadata;
  uint64_t data_offset = 0;  // 8 + N
};

// Parses and validates like the reference reader (offsets tile the data section exactly, sizes
// match shapes) and more strictly (duplicate names, non-string metadata). `file_size` is the
// size of the whole file; `header_bytes` the N bytes after the length prefix.
Header ParseHeader(std::string_view header_bytes, uint64_t file_size);
// The same, given a whole file's bytes (the 8-byte length, the header, the data).
Header ParseFileHeader(std::span<const std::byte> file);

class File {
 public:
  static File Open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return map_.path(); }
  const Header& header() const { return header_; }
  const TensorEntry* Find(std::string_view name) const;
  const TensorEntry& Get(std::string_view name) const;  // throws FormatError naming file and key
  std::span<const std::byte> Data(const TensorEntry& entry) const;
  StridedView View(const TensorEntry& entry) const;

 private:
  File(MappedFile map, Header header) : map_(std::move(map)), header_(std::move(header)) {}
  MappedFile map_;
  Header header_;
};

// A tensor's entry in the header.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
};

// A tensor to write; `data` is contiguous row-major little-endian and must outlive the call.
struct TensorRef {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;
};
TensorRef Ref(std::string name, const Tensor& tensor);

// The header bytes (length prefix included) that the reference writer produces: entries sorted
// by dtype (largest first, in safetensors' Dtype order) then by name, and the JSON space-padded
// to a multiple of 8. Sorts `specs` into file order.
std::string SerializeHeader(std::vector<TensorSpec>& specs,
                            const std::optional<std::map<std::string, std::string>>& metadata);

// The size of the file StreamWriter writes for these specs: header and data.
uint64_t FileSize(std::vector<TensorSpec> specs,
                  const std::optional<std::map<std::string, std::string>>& metadata);

// Writes a file whose tensors arrive one at a time and in any order: the header (and so every
// tensor's place) is fixed up front from the specs, and each tensor is written into its slot.
class StreamWriter {
 public:
  // Writes the header into `file` (which must outlive this) and sizes it.
  StreamWriter(OutputFile& file, std::vector<TensorSpec> specs,
               const std::optional<std::map<std::string, std::string>>& metadata);
  StreamWriter(const StreamWriter&) = delete;  // in_file_order_ points into slots_
  StreamWriter& operator=(const StreamWriter&) = delete;
  StreamWriter(StreamWriter&&) = default;  // a map's nodes stay where they are

  void Write(const std::string& name, std::span<const std::byte> data);
  // The tensor's bytes given as consecutive pieces.
  void Write(const std::string& name, std::span<const std::span<const std::byte>> pieces);
  // Fails unless every tensor was written; the caller then commits the file.
  void Finish() const;
  uint64_t file_size() const { return file_size_; }
  // Bytes [0, written_prefix()) are written and final: the header and the tensors up to the
  // first one (in file order) still missing. The whole file once every tensor is written.
  uint64_t written_prefix() const { return written_prefix_; }

 private:
  struct Slot {
    uint64_t offset = 0;
    uint64_t size = 0;
    bool written = false;
  };
  OutputFile& file_;
  std::map<std::string, Slot> slots_;
  std::vector<const Slot*> in_file_order_;
  std::size_t first_missing_ = 0;  // in in_file_order_
  uint64_t written_prefix_ = 0;
  uint64_t file_size_ = 0;
};

// Writes through a temporary file that is fsynced and renamed into place.
void Write(const std::filesystem::path& path, std::vector<TensorRef> tensors,
           const std::optional<std::map<std::string, std::string>>& metadata, bool overwrite);

}  // namespace adapter_job::safetensors
