#include "adapter_job/writer/written_file_digest.h"

#include <algorithm>
#include <vector>

#include "adapter_job/core/error.h"

namespace adapter_job::writer {

namespace {
// Large enough that a read and an update per piece cost nothing beside the hashing itself.
constexpr uint64_t kPieceBytes = uint64_t{8} << 20;
}  // namespace

WrittenFileDigest::WrittenFileDigest(const OutputFile& file)
    : file_(file), thread_([this] { Run(); }) {}

WrittenFileDigest::~WrittenFileDigest() {
  {
    const std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void WrittenFileDigest::Final(uint64_t end) {
  {
    const std::lock_guard lock(mutex_);
    if (end <= final_end_) return;
    final_end_ = end;
  }
  changed_.notify_one();
}

std::string WrittenFileDigest::Finish(uint64_t size) {
  {
    const std::lock_guard lock(mutex_);
    final_end_ = std::max(final_end_, size);
    finishing_ = true;
  }
  changed_.notify_one();
  thread_.join();
  if (error_) std::rethrow_exception(error_);
  if (hashed_ != size)
    Fail<IoError>("the output's digest covers {} bytes, but the file has {}", hashed_, size);
  return digest_.HexDigest();
}

void WrittenFileDigest::Run() {
  try {
    std::vector<std::byte> piece;
    for (;;) {
      uint64_t end = 0;
      {
        std::unique_lock lock(mutex_);
        changed_.wait(lock, [&] { return stopping_ || finishing_ || final_end_ > hashed_; });
        if (stopping_ || (finishing_ && final_end_ == hashed_)) return;
        end = final_end_;
      }
      while (hashed_ < end) {
        piece.resize(std::min(kPieceBytes, end - hashed_));
        file_.ReadAt(hashed_, piece);
        digest_.Update(piece);
        hashed_ += piece.size();
        const std::lock_guard lock(mutex_);
        if (stopping_) return;
      }
    }
  } catch (...) {
    error_ = std::current_exception();
  }
}

}  // namespace adapter_job::writer
