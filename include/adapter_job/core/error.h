// One error channel for the whole project: exceptions that carry their context.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace adapter_job {

// Process exit codes shared by every subcommand (documented in README.md).
enum class ExitCode : int {
  kOk = 0,
  kInternal = 1,            // a bug or an unexpected exception
  kBadInput = 2,            // usage, checkpoint, model or configuration problems
  kVerificationFailed = 3,  // the export was written but did not prove correct
  kInfrastructure = 4,      // I/O, MPI, NCCL, CUDA failures
};

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message), message_(message) {}

  // Prepends an outer frame, e.g. the file being read, so the final message reads outside-in.
  void AddContext(const std::string& context) { message_ = context + ": " + message_; }

  const char* what() const noexcept override { return message_.c_str(); }
  virtual ExitCode exit_code() const { return ExitCode::kInternal; }

  // Raised where other MPI ranks may be blocked waiting on this one: main() must abort them all.
  void MarkAbortPeers() { abort_peers_ = true; }
  bool abort_peers() const { return abort_peers_; }

 private:
  std::string message_;
  bool abort_peers_ = false;
};

// The input (checkpoint, model, config file, command line) is malformed or inconsistent.
class FormatError : public Error {
 public:
  using Error::Error;
  ExitCode exit_code() const override { return ExitCode::kBadInput; }
};

// A file system operation failed.
class IoError : public Error {
 public:
  using Error::Error;
  ExitCode exit_code() const override { return ExitCode::kInfrastructure; }
};

// Communication between the ranks failed (MPI, NCCL, CUDA) or a peer rank died. It names the rank
// and host that saw it: on a cluster, which node's log to read. Set-up problems that every rank
// reports alike (a missing GPU, a build without NCCL) have no place.
class CommError : public Error {
 public:
  explicit CommError(const std::string& message) : Error(message) {}
  CommError(const std::string& message, const std::string& host, int rank)
      : Error(fmt::format("rank {} on {}: {}", rank, host, message)), host_(host), rank_(rank) {}
  ExitCode exit_code() const override { return ExitCode::kInfrastructure; }
  const std::string& host() const { return host_; }  // empty without a place
  int rank() const { return rank_; }                 // the world rank; -1 without a place

 private:
  std::string host_;
  int rank_ = -1;
};

// An error that crossed a boundary (a plugin, another rank) with its exit code.
class CodedError : public Error {
 public:
  CodedError(const std::string& message, ExitCode code) : Error(message), code_(code) {}
  ExitCode exit_code() const override { return code_; }

 private:
  ExitCode code_;
};

template <typename E = FormatError, typename... Args>
[[noreturn]] void Fail(fmt::format_string<Args...> format, Args&&... args) {
  throw E(fmt::format(format, std::forward<Args>(args)...));
}

// Runs `body`; if it throws an adapter_job::Error, prefixes `context()` to the message.
template <typename Body, typename Context>
decltype(auto) WithContext(Context&& context, Body&& body) {
  try {
    return body();
  } catch (Error& e) {
    e.AddContext(context());
    throw;
  }
}

}  // namespace adapter_job
