// RAII file handles: positional reads that count their bytes, read-only maps, and output files
// that appear under their final name only once complete and on disk.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace adapter_job {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept;
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  ~UniqueFd();

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Closes and reports the error the destructor would swallow.
  void Close(const std::filesystem::path& path_for_errors);

 private:
  int fd_ = -1;
};

// A file read with pread(2): only the requested bytes are touched, a truncated file is an error
// rather than a SIGBUS, and every byte read is counted.
class ReadOnlyFile {
 public:
  // Refuses (FormatError) a directory, FIFO or device: only regular files have an end and a size.
  static ReadOnlyFile Open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  uint64_t size() const { return size_; }
  uint64_t bytes_read() const { return bytes_read_->load(); }

  // Throws FormatError naming the file if [offset, offset + out.size()) is past its end.
  void ReadExact(uint64_t offset, std::span<std::byte> out) const;
  std::vector<std::byte> Read(uint64_t offset, uint64_t length) const;

 private:
  ReadOnlyFile(std::filesystem::path path, UniqueFd fd, uint64_t size);

  std::filesystem::path path_;
  UniqueFd fd_;
  uint64_t size_ = 0;
  std::unique_ptr<std::atomic<uint64_t>> bytes_read_;
};

// A read-only private mapping of a whole file, for large inputs read many times (model weights).
class MappedFile {
 public:
  static MappedFile Open(const std::filesystem::path& path);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  ~MappedFile();

  const std::filesystem::path& path() const { return path_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }

 private:
  MappedFile(std::filesystem::path path, const std::byte* data, std::size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}

  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A file that appears under its final name only once complete and on disk. Until Commit() it
// is anonymous (O_TMPFILE) where the file system allows, so a killed process leaves nothing
// behind; elsewhere (e.g. some network file systems) it is a hidden temporary that the
// destructor removes.
class OutputFile {
 public:
  // Fails if `final_path` exists and `overwrite` is false.
  static OutputFile Create(const std::filesystem::path& final_path, bool overwrite);
  // A file in `dir` whose name is given at CommitAs(); errors name it `intended` (where it is
  // meant to go), or `dir` if that is empty.
  static OutputFile CreateUnnamed(const std::filesystem::path& dir,
                                  const std::filesystem::path& intended = {});
  OutputFile(OutputFile&& other) noexcept;
  OutputFile& operator=(OutputFile&&) = delete;
  ~OutputFile();

  void Write(std::span<const std::byte> bytes);
  void Write(std::string_view text);
  // Positional writes for files filled out of order; Resize() first sets the final size.
  void Resize(uint64_t size);
  void WriteAt(uint64_t offset, std::span<const std::byte> bytes);
  // Writes `pieces` back to back from `offset` (pwritev: no gathering copy).
  void WriteAt(uint64_t offset, std::span<const std::span<const std::byte>> pieces);

  // fsyncs the data, links it in under `final_path` (replacing an existing file only when
  // `overwrite`), and fsyncs the directory.
  void CommitAs(const std::filesystem::path& final_path, bool overwrite) &&;
  void Commit() && { std::move(*this).CommitAs(final_path_, overwrite_); }

 private:
  static OutputFile OpenUnnamed(const std::filesystem::path& dir);
  OutputFile(UniqueFd fd, std::filesystem::path temp_path, std::filesystem::path final_path,
             bool overwrite);

  UniqueFd fd_;
  std::filesystem::path temp_path_;  // empty for an O_TMPFILE file
  std::filesystem::path final_path_;
  std::filesystem::path name_for_errors_;
  bool overwrite_ = false;
  bool committed_ = false;
};

void FsyncDirectory(const std::filesystem::path& dir);

// The nearest ancestor of `path` that exists, which must be a directory (FormatError otherwise):
// where an output whose missing parents are made only when it is complete waits, unnamed.
std::filesystem::path NearestExistingDirectory(const std::filesystem::path& path);

// Whole small text files (configs, markers). Like ReadOnlyFile::Open, refuses anything but a
// regular file (FormatError naming the path) and files over `max_bytes`.
std::string ReadTextFile(const std::filesystem::path& path, std::size_t max_bytes = 64u << 20);

}  // namespace adapter_job
