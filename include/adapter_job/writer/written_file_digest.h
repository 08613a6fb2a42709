// The sha256 of an output file written out of order (a safetensors file whose tensors arrive layer
// by layer), computed while it is written: a thread of its own reads back and hashes the bytes as
// far as they are final, so the run report's digest of a large adapter costs the run only the part
// written last, not a second pass over the whole file.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "adapter_job/core/file.h"
#include "adapter_job/core/sha256.h"

namespace adapter_job::writer {

class WrittenFileDigest {
 public:
  // `file` must outlive this; it is only read, at offsets Final() has declared written.
  explicit WrittenFileDigest(const OutputFile& file);
  WrittenFileDigest(const WrittenFileDigest&) = delete;
  WrittenFileDigest& operator=(const WrittenFileDigest&) = delete;
  ~WrittenFileDigest();  // stops the thread; an unfinished digest is dropped

  // Bytes [0, end) of the file are written and will not change.
  void Final(uint64_t end);
  // Waits until [0, size) is hashed and returns its digest (lower-case hex); rethrows what
  // failed on the thread. Call once, when the file is complete.
  std::string Finish(uint64_t size);

 private:
  void Run();

  const OutputFile& file_;
  Sha256 digest_;
  std::mutex mutex_;
  std::condition_variable changed_;
  uint64_t final_end_ = 0;  // guarded by mutex_, as are the two below
  bool finishing_ = false;
  bool stopping_ = false;
  uint64_t hashed_ = 0;  // the thread's own until it ends
  std::exception_ptr error_;
  std::thread thread_;  // last: it starts once the rest is built
};

}  // namespace adapter_job::writer
