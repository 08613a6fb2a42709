#include "adapter_job/core/file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"

namespace adapter_job {
namespace {

[[noreturn]] void FailErrno(std::string_view action, const std::filesystem::path& path) {
  const int saved = errno;
  Fail<IoError>("{} '{}': {}", action, path.string(), std::strerror(saved));
}

// A path the user named that does not exist is bad input; other failures are the system's.
[[noreturn]] void FailOpen(const std::filesystem::path& path) {
  const int saved = errno;
  if (saved == ENOENT || saved == ENOTDIR) {
    Fail<FormatError>("'{}' does not exist", path.string());
  }
  Fail<IoError>("cannot open '{}': {}", path.string(), std::strerror(saved));
}

std::string_view FileTypeName(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a plain file";
}

// Every input is a regular file: a FIFO would block open(2) and read(2) forever, and a device
// such as /dev/zero never ends. O_NONBLOCK keeps open(2) from waiting for a FIFO's writer (it
// changes nothing for regular files); O_NOCTTY keeps a terminal from becoming ours.
UniqueFd OpenRegularFile(const std::filesystem::path& path, uint64_t& size) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd.valid()) FailOpen(path);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) FailErrno("cannot stat", path);
  if (!S_ISREG(st.st_mode)) {
    Fail<FormatError>("'{}' is not a regular file: it is {}", path.string(),
                      FileTypeName(st.st_mode));
  }
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0) {
    FailErrno("cannot set flags on", path);
  }
  size = static_cast<uint64_t>(st.st_size);
  return fd;
}

}  // namespace

UniqueFd::UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

UniqueFd::~UniqueFd() {
  if (fd_ >= 0) ::close(fd_);
}

void UniqueFd::Close(const std::filesystem::path& path_for_errors) {
  const int fd = std::exchange(fd_, -1);
  if (fd >= 0 && ::close(fd) != 0) FailErrno("cannot close", path_for_errors);
}

ReadOnlyFile::ReadOnlyFile(std::filesystem::path path, UniqueFd fd, uint64_t size)
    : path_(std::move(path)),
      fd_(std::move(fd)),
      size_(size),
      bytes_read_(std::make_unique<std::atomic<uint64_t>>(0)) {}

ReadOnlyFile ReadOnlyFile::Open(const std::filesystem::path& path) {
  uint64_t size = 0;
  UniqueFd fd = OpenRegularFile(path, size);
  return ReadOnlyFile(path, std::move(fd), size);
}

void ReadOnlyFile::ReadExact(uint64_t offset, std::span<std::byte> out) const {
  const uint64_t end = CheckedAdd(offset, out.size(), "read range");
  if (end > size_) {
    Fail("'{}' is truncated: need bytes [{}, {}) but the file has {} bytes", path_.string(), offset,
         end, size_);
  }
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t n =
        ::pread(fd_.get(), out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      FailErrno("cannot read", path_);
    }
    if (n == 0) {
      Fail("'{}' ended at byte {} while reading [{}, {})", path_.string(), offset + done, offset,
           end);
    }
    done += static_cast<std::size_t>(n);
  }
  bytes_read_->fetch_add(out.size());
}

std::vector<std::byte> ReadOnlyFile::Read(uint64_t offset, uint64_t length) const {
  if (length > size_) {
    Fail("'{}' is truncated: need {} bytes at offset {} but the file has {} bytes", path_.string(),
         length, offset, size_);
  }
  std::vector<std::byte> out(length);
  ReadExact(offset, out);
  return out;
}

MappedFile MappedFile::Open(const std::filesystem::path& path) {
  uint64_t size = 0;
  // Mapped through the descriptor that was checked, so nothing can swap the file in between.
  const UniqueFd fd = OpenRegularFile(path, size);
  if (size == 0) return MappedFile(path, nullptr, 0);
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (data == MAP_FAILED) FailErrno("cannot map", path);
  return MappedFile(path, static_cast<const std::byte*>(data), size);
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
}

OutputFile::OutputFile(UniqueFd fd, std::filesystem::path temp_path,
                       std::filesystem::path final_path, bool overwrite)
    : fd_(std::move(fd)),
      temp_path_(std::move(temp_path)),
      final_path_(std::move(final_path)),
      overwrite_(overwrite) {}

OutputFile OutputFile::CreateUnnamed(const std::filesystem::path& dir,
                                     const std::filesystem::path& intended) {
  OutputFile file = OpenUnnamed(dir);
  file.name_for_errors_ = intended.empty() ? dir : intended;
  return file;
}

OutputFile OutputFile::OpenUnnamed(const std::filesystem::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644));
  if (fd.valid()) return OutputFile(std::move(fd), {}, {}, false);
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
    FailErrno("cannot create a file in", dir);
  // No O_TMPFILE here: a hidden, uniquely named file instead.
  std::string pattern = (dir / ".adapter_job.tmp-XXXXXX").string();
  UniqueFd named(::mkostemp(pattern.data(), O_CLOEXEC));
  if (!named.valid()) FailErrno("cannot create a file in", dir);
  const mode_t mask = ::umask(0);
  ::umask(mask);
  ::fchmod(named.get(), 0644 & ~mask);
  return OutputFile(std::move(named), pattern, {}, false);
}

OutputFile OutputFile::Create(const std::filesystem::path& final_path, bool overwrite) {
  if (!overwrite && std::filesystem::exists(final_path)) {
    Fail<FormatError>("'{}' already exists (pass --overwrite to replace it)", final_path.string());
  }
  const auto dir = final_path.has_parent_path() ? final_path.parent_path() : ".";
  OutputFile file = CreateUnnamed(dir, final_path);
  file.final_path_ = final_path;
  file.overwrite_ = overwrite;
  return file;
}

OutputFile::OutputFile(OutputFile&& other) noexcept
    : fd_(std::move(other.fd_)),
      temp_path_(std::move(other.temp_path_)),
      final_path_(std::move(other.final_path_)),
      name_for_errors_(std::move(other.name_for_errors_)),
      overwrite_(other.overwrite_),
      committed_(std::exchange(other.committed_, true)) {}

OutputFile::~OutputFile() {
  if (!committed_ && !temp_path_.empty()) {
    std::error_code ignored;
    std::filesystem::remove(temp_path_, ignored);
  }
}

void OutputFile::Write(std::span<const std::byte> bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd_.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      FailErrno("cannot write", name_for_errors_);
    }
    done += static_cast<std::size_t>(n);
  }
}

void OutputFile::Write(std::string_view text) { Write(std::as_bytes(std::span(text))); }

void OutputFile::Resize(uint64_t size) {
  if (::ftruncate(fd_.get(), static_cast<off_t>(size)) != 0)
    FailErrno("cannot resize", name_for_errors_);
}

void OutputFile::WriteAt(uint64_t offset, std::span<const std::byte> bytes) {
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd_.get(), bytes.data() + done, bytes.size() - done,
                               static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      FailErrno("cannot write", name_for_errors_);
    }
    done += static_cast<std::size_t>(n);
  }
}

void OutputFile::WriteAt(uint64_t offset, std::span<const std::span<const std::byte>> pieces) {
  std::vector<iovec> iov;
  for (const auto& piece : pieces) {
    iov.push_back({const_cast<std::byte*>(piece.data()), piece.size()});
  }
  std::size_t first = 0;
  while (first < iov.size()) {
    const int count = static_cast<int>(std::min<std::size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = ::pwritev(fd_.get(), iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      FailErrno("cannot write", name_for_errors_);
    }
    offset += static_cast<uint64_t>(n);
    // Skip what was written, possibly ending inside an iovec.
    while (n > 0 && first < iov.size()) {
      const auto step = std::min<std::size_t>(static_cast<std::size_t>(n), iov[first].iov_len);
      iov[first].iov_base = static_cast<std::byte*>(iov[first].iov_base) + step;
      iov[first].iov_len -= step;
      n -= static_cast<ssize_t>(step);
      if (iov[first].iov_len == 0) ++first;
    }
    while (first < iov.size() && iov[first].iov_len == 0) ++first;
  }
}

void OutputFile::CommitAs(const std::filesystem::path& final_path, bool overwrite) && {
  if (::fsync(fd_.get()) != 0) FailErrno("cannot fsync", final_path);
  // An O_TMPFILE file is linked in through its /proc descriptor; a named one is linked directly.
  const std::string source =
      temp_path_.empty() ? "/proc/self/fd/" + std::to_string(fd_.get()) : temp_path_.string();
  const int follow = temp_path_.empty() ? AT_SYMLINK_FOLLOW : 0;
  if (!overwrite) {
    // link(2) refuses an existing target, so nothing that appeared meanwhile is replaced.
    if (::linkat(AT_FDCWD, source.c_str(), AT_FDCWD, final_path.c_str(), follow) != 0) {
      FailErrno("cannot create", final_path);
    }
  } else {
    std::filesystem::path staged = final_path;
    staged += ".tmp." + std::to_string(::getpid());
    if (::linkat(AT_FDCWD, source.c_str(), AT_FDCWD, staged.c_str(), follow) != 0) {
      FailErrno("cannot create", staged);
    }
    if (::rename(staged.c_str(), final_path.c_str()) != 0) {
      const int saved = errno;
      ::unlink(staged.c_str());  // never leave the temporary name behind
      errno = saved;
      FailErrno("cannot rename into", final_path);
    }
  }
  if (!temp_path_.empty()) ::unlink(temp_path_.c_str());
  fd_.Close(final_path);
  committed_ = true;
  FsyncDirectory(final_path.has_parent_path() ? final_path.parent_path() : ".");
}

std::filesystem::path NearestExistingDirectory(const std::filesystem::path& path) {
  std::filesystem::path anchor = std::filesystem::absolute(path).lexically_normal().parent_path();
  while (!std::filesystem::exists(anchor) && anchor.has_parent_path() &&
         anchor != anchor.parent_path())
    anchor = anchor.parent_path();
  if (!std::filesystem::is_directory(anchor)) {
    Fail<FormatError>("cannot write '{}': '{}' is not a directory", path.string(), anchor.string());
  }
  return anchor;
}

void FsyncDirectory(const std::filesystem::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) FailErrno("cannot open directory", dir);
  if (::fsync(fd.get()) != 0) FailErrno("cannot fsync directory", dir);
}

std::string ReadTextFile(const std::filesystem::path& path, std::size_t max_bytes) {
  const ReadOnlyFile file = ReadOnlyFile::Open(path);
  if (file.size() > max_bytes) {
    Fail("'{}' is {} bytes, more than the {} allowed for this file", path.string(), file.size(),
         max_bytes);
  }
  std::string text(file.size(), '\0');
  file.ReadExact(0, std::as_writable_bytes(std::span(text)));
  return text;
}

}  // namespace adapter_job
