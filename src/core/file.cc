#include "adapter_job/core/file.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <memory>
#include <random>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"

namespace adapter_job {
namespace {

[[noreturn]] void FailErrno(std::string_view action, const std::filesystem::path& path) {
  const int saved = errno;
  Fail<IoError>("{} '{}': {}", action, path.string(), std::strerror(saved));
}

// pread(2) into `out` until it is full or the file ends; how many bytes it read.
std::size_t ReadUntilFullOrEnd(int fd, uint64_t offset, std::span<std::byte> out,
                               std::string_view action, const std::filesystem::path& path) {
  std::size_t done = 0;
  while (done < out.size()) {
    const ssize_t n =
        ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      FailErrno(action, path);
    }
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
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
  if (const std::size_t done = ReadUntilFullOrEnd(fd_.get(), offset, out, "cannot read", path_);
      done < out.size()) {
    Fail("'{}' ended at byte {} while reading [{}, {})", path_.string(), offset + done, offset,
         end);
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

namespace {

mode_t CurrentUmask() {
  const mode_t mask = ::umask(0);
  ::umask(mask);
  return mask;
}

std::string ForErrors(const std::filesystem::path& intended, const std::filesystem::path& dir) {
  return (intended.empty() ? dir : intended).string();
}

// Six characters, as mkstemp(3) would choose them, for names it cannot make (links).
std::string UniqueSuffix() {
  static constexpr std::string_view kChars =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  thread_local std::mt19937_64 random(std::random_device{}() ^
                                      (static_cast<uint64_t>(::getpid()) << 32));
  std::string suffix(6, ' ');
  for (char& c : suffix) c = kChars[random() % kChars.size()];
  return suffix;
}

[[noreturn]] void FailPublish(const std::filesystem::path& intended, std::string_view action,
                              const std::filesystem::path& path) {
  const int saved = errno;
  Fail<IoError>("cannot write '{}': cannot {} '{}': {}", intended.string(), action, path.string(),
                std::strerror(saved));
}

// The output that was replaced; the new one is in place, so a failure here loses nothing.
void RemovePrevious(std::filesystem::path& path) {
  std::error_code ignored;
  std::filesystem::remove_all(path, ignored);
  path.clear();
}

}  // namespace

PendingPath PendingPath::File(const std::filesystem::path& dir, std::string_view prefix,
                              const std::filesystem::path& intended, UniqueFd* fd) {
  std::string pattern = (dir / (std::string(prefix) + "XXXXXX")).string();
  UniqueFd created(::mkostemp(pattern.data(), O_CLOEXEC));
  if (!created.valid()) FailPublish(ForErrors(intended, dir), "create a file in", dir);
  PendingPath pending(pattern, intended.empty() ? dir : intended);
  ::fchmod(created.get(), 0644 & ~CurrentUmask());  // mkostemp makes it 0600
  if (fd != nullptr) *fd = std::move(created);
  return pending;
}

PendingPath PendingPath::Directory(const std::filesystem::path& dir, std::string_view prefix,
                                   const std::filesystem::path& intended) {
  std::string pattern = (dir / (std::string(prefix) + "XXXXXX")).string();
  if (::mkdtemp(pattern.data()) == nullptr)
    FailPublish(ForErrors(intended, dir), "create a directory in", dir);
  PendingPath pending(pattern, intended.empty() ? dir : intended);
  ::chmod(pattern.c_str(), 0777 & ~CurrentUmask());  // mkdtemp makes it 0700
  return pending;
}

PendingPath PendingPath::Link(int fd, const std::filesystem::path& dir, std::string_view prefix,
                              const std::filesystem::path& intended) {
  const std::string source = "/proc/self/fd/" + std::to_string(fd);
  for (int attempt = 0;; ++attempt) {
    const std::filesystem::path name = dir / (std::string(prefix) + UniqueSuffix());
    if (::linkat(AT_FDCWD, source.c_str(), AT_FDCWD, name.c_str(), AT_SYMLINK_FOLLOW) == 0)
      return PendingPath(name, intended.empty() ? dir : intended);
    if (errno != EEXIST || attempt >= 100) FailPublish(ForErrors(intended, dir), "create", name);
  }
}

PendingPath::PendingPath(PendingPath&& other) noexcept
    : path_(std::exchange(other.path_, {})), intended_(std::move(other.intended_)) {}

PendingPath::~PendingPath() {
  if (!path_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
}

void PendingPath::Publish(const std::filesystem::path& target, bool overwrite) && {
  // fsync(2) of any descriptor flushes the file (or a directory's entries), so a fresh one does.
  {
    UniqueFd fd(::open(path_.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid() || ::fsync(fd.get()) != 0) FailPublish(intended_, "fsync", path_);
    fd.Close(path_);
  }
  struct stat st {};
  if (::lstat(path_.c_str(), &st) != 0) FailPublish(intended_, "stat", path_);
  const bool directory = S_ISDIR(st.st_mode);
  const auto unsupported = [] { return errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP; };
  const std::filesystem::path parent = target.has_parent_path() ? target.parent_path() : ".";
  const char* from = path_.c_str();
  const char* to = target.c_str();
  if (!overwrite) {
    if (::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) != 0) {
      // Without RENAME_NOREPLACE a file is linked in (link(2) refuses an existing target too).
      if (directory || !unsupported() || ::link(from, to) != 0)
        FailPublish(intended_, "rename into place", path_);
      ::unlink(from);
    }
  } else if (!directory) {
    if (::rename(from, to) != 0) FailPublish(intended_, "rename into place", path_);
  } else if (::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_EXCHANGE) == 0) {
    // One step: the target always holds a complete output, old or new; the old is now ours.
    FsyncDirectory(parent);
    RemovePrevious(path_);
    return;
  } else if (errno == ENOENT) {
    if (::renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) != 0 &&
        (!unsupported() || ::rename(from, to) != 0))
      FailPublish(intended_, "rename into place", path_);
  } else if (!unsupported()) {
    FailPublish(intended_, "exchange with the existing output", path_);
  } else {
    // No RENAME_EXCHANGE on this file system: move the old one aside, then the new one in.
    std::filesystem::path previous = path_;
    previous += ".previous";
    if (::rename(to, previous.c_str()) != 0)
      FailPublish(intended_, "move aside the existing output for", path_);
    if (::rename(from, to) != 0) {
      const int saved = errno;
      ::rename(previous.c_str(), to);
      errno = saved;
      FailPublish(intended_, "rename into place", path_);
    }
    path_.clear();
    FsyncDirectory(parent);
    RemovePrevious(previous);
    return;
  }
  path_.clear();
  FsyncDirectory(parent);
}

OutputFile::OutputFile(UniqueFd fd, std::optional<PendingPath> named)
    : fd_(std::move(fd)), named_(std::move(named)) {}

OutputFile OutputFile::CreateUnnamed(const std::filesystem::path& dir,
                                     const std::filesystem::path& intended) {
  OutputFile file = [&] {
    // Readable too: a digest of the output reads back what was written (WrittenFileDigest).
    UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0644));
    if (fd.valid()) return OutputFile(std::move(fd), std::nullopt);
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
      FailErrno("cannot create a file in", dir);
    // No O_TMPFILE here: a hidden, uniquely named file instead.
    UniqueFd named;
    PendingPath pending = PendingPath::File(dir, kOutputTemporaryPrefix, intended, &named);
    return OutputFile(std::move(named), std::move(pending));
  }();
  file.name_for_errors_ = intended.empty() ? dir : intended;
  return file;
}

namespace {

std::filesystem::path DirectoryOf(const std::filesystem::path& file) {
  return file.has_parent_path() ? file.parent_path() : ".";
}

void RefuseExisting(const std::filesystem::path& final_path, bool overwrite) {
  if (!overwrite && std::filesystem::exists(final_path)) {
    Fail<FormatError>("'{}' already exists (pass --overwrite to replace it)", final_path.string());
  }
}

}  // namespace

void RequireWritableDirectory(const std::filesystem::path& dir) {
  if (::access(dir.c_str(), W_OK | X_OK) != 0) FailErrno("cannot create a file in", dir);
}

void OutputFile::CheckCreate(const std::filesystem::path& final_path, bool overwrite) {
  RefuseExisting(final_path, overwrite);
  RequireWritableDirectory(DirectoryOf(final_path));
}

OutputFile OutputFile::Create(const std::filesystem::path& final_path, bool overwrite) {
  RefuseExisting(final_path, overwrite);
  OutputFile file = CreateUnnamed(DirectoryOf(final_path), final_path);
  file.final_path_ = final_path;
  file.overwrite_ = overwrite;
  return file;
}

OutputFile::OutputFile(OutputFile&& other) noexcept
    : fd_(std::move(other.fd_)),
      named_(std::exchange(other.named_, std::nullopt)),
      final_path_(std::move(other.final_path_)),
      name_for_errors_(std::move(other.name_for_errors_)),
      overwrite_(other.overwrite_) {}

OutputFile::~OutputFile() = default;  // an unpublished named file goes with named_

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

void OutputFile::ReadAt(uint64_t offset, std::span<std::byte> out) const {
  if (const std::size_t done =
          ReadUntilFullOrEnd(fd_.get(), offset, out, "cannot read back", name_for_errors_);
      done < out.size()) {
    Fail<IoError>("'{}' ended at byte {} while reading back [{}, {})", name_for_errors_.string(),
                  offset + done, offset, offset + out.size());
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
  const auto dir = final_path.has_parent_path() ? final_path.parent_path() : ".";
  // An O_TMPFILE file gets a hidden name beside the target first: rename(2) needs one.
  PendingPath pending = named_
                            ? std::move(*std::exchange(named_, std::nullopt))
                            : PendingPath::Link(fd_.get(), dir, kOutputTemporaryPrefix, final_path);
  fd_.Close(final_path);  // a network file system may report a failed write only here
  std::move(pending).Publish(final_path, overwrite);
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
