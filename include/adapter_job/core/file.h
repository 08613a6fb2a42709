// RAII file handles: positional reads that count their bytes, read-only maps, and outputs
// (files and directories) that appear under their final name only once complete and on disk.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
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

// The hidden name an output file has while it is written (OutputFile), before it is renamed into
// place: `.adapter_job.tmp-` and six unique characters.
inline constexpr std::string_view kOutputTemporaryPrefix = ".adapter_job.tmp-";
inline bool IsOutputTemporary(std::string_view name) {
  return name.size() == kOutputTemporaryPrefix.size() + 6 &&
         name.starts_with(kOutputTemporaryPrefix);
}

// The one way an output is published (files, the staged adapter directory, the HDF5 report):
// it is written under a unique hidden name in the target's directory, made durable (fsync), and
// renamed into place, replacing an existing target only when asked; until then the destructor
// removes it, so a failure leaves nothing behind.
class PendingPath {
 public:
  // A new empty file, or directory, `dir/<prefix>XXXXXX` (a unique suffix), private to its
  // creator until Publish (files 0644 and directories 0777, less the umask). Errors name
  // `intended` (where it is meant to go).
  static PendingPath File(const std::filesystem::path& dir, std::string_view prefix,
                          const std::filesystem::path& intended, UniqueFd* fd = nullptr);
  static PendingPath Directory(const std::filesystem::path& dir, std::string_view prefix,
                               const std::filesystem::path& intended);
  // Names the open unnamed (O_TMPFILE) file `fd` as `dir/<prefix>XXXXXX`.
  static PendingPath Link(int fd, const std::filesystem::path& dir, std::string_view prefix,
                          const std::filesystem::path& intended);
  PendingPath(PendingPath&& other) noexcept;
  PendingPath& operator=(PendingPath&&) = delete;
  ~PendingPath();  // removes what was not published, a directory with all in it

  const std::filesystem::path& path() const { return path_; }

  // fsyncs it (a file's data, a directory's entries), renames it to `target` (in the same
  // directory: rename(2) is atomic only within one file system) and fsyncs that directory.
  // Without `overwrite` an existing target is never replaced, even one that appears meanwhile
  // (RENAME_NOREPLACE, or link(2) where the file system lacks it). With it, a file replaces the
  // target in one rename; a directory is exchanged with it (RENAME_EXCHANGE, so the target never
  // goes missing), and the previous one is removed.
  void Publish(const std::filesystem::path& target, bool overwrite) &&;

 private:
  PendingPath(std::filesystem::path path, std::filesystem::path intended)
      : path_(std::move(path)), intended_(std::move(intended)) {}

  std::filesystem::path path_;  // empty once published or moved from
  std::filesystem::path intended_;
};

// A file that appears under its final name only once complete and on disk. Until Commit() it
// is anonymous (O_TMPFILE) where the file system allows, so a killed process leaves nothing
// behind; elsewhere (e.g. some network file systems) it is a hidden PendingPath that the
// destructor removes.
class OutputFile {
 public:
  // Fails if `final_path` exists and `overwrite` is false.
  static OutputFile Create(const std::filesystem::path& final_path, bool overwrite);
  // Create's checks, and that its directory takes a new file, creating nothing (--dry-run).
  static void CheckCreate(const std::filesystem::path& final_path, bool overwrite);
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
  // Reads back what was written (IoError if [offset, offset + out.size()) is past the end).
  // Safe beside writes elsewhere in the file from another thread.
  void ReadAt(uint64_t offset, std::span<std::byte> out) const;

  // fsyncs the data and publishes it under `final_path` as PendingPath::Publish does.
  void CommitAs(const std::filesystem::path& final_path, bool overwrite) &&;
  void Commit() && { std::move(*this).CommitAs(final_path_, overwrite_); }

 private:
  OutputFile(UniqueFd fd, std::optional<PendingPath> named);

  UniqueFd fd_;
  std::optional<PendingPath> named_;  // none for an O_TMPFILE file
  std::filesystem::path final_path_;
  std::filesystem::path name_for_errors_;
  bool overwrite_ = false;
};

void FsyncDirectory(const std::filesystem::path& dir);

// The nearest ancestor of `path` that exists, which must be a directory (FormatError otherwise):
// where an output whose missing parents are made only when it is complete waits, unnamed.
std::filesystem::path NearestExistingDirectory(const std::filesystem::path& path);

// Fails as creating a file in `dir` would (IoError naming it) unless this process may create
// files there: what a --dry-run checks of where an output would be written.
void RequireWritableDirectory(const std::filesystem::path& dir);

// Whole small text files (configs, markers). Like ReadOnlyFile::Open, refuses anything but a
// regular file (FormatError naming the path) and files over `max_bytes`.
std::string ReadTextFile(const std::filesystem::path& path, std::size_t max_bytes = 64u << 20);

}  // namespace adapter_job
