#include "console.h"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <unistd.h>

#include <ctime>
#include <iostream>

#include "adapter_job/core/error.h"

namespace adapter_job::cli {
namespace {

namespace po = boost::program_options;

LogLevel ParseLogLevel(const std::string& name) {
  if (name == "error") return LogLevel::kError;
  if (name == "warning") return LogLevel::kWarning;
  if (name == "info") return LogLevel::kInfo;
  if (name == "debug") return LogLevel::kDebug;
  Fail("--log-level must be error, warning, info or debug, not '{}'", name);
}

std::string Timestamp() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", utc);
}

std::string Megabytes(double bytes) { return fmt::format("{:.1f} MB", bytes / 1e6); }

}  // namespace

void AddConsoleOptions(po::options_description& options) {
  // clang-format off
  options.add_options()
    ("log-level", po::value<std::string>()->default_value("info"),
     "error | warning | info (progress and results) | debug (a line per step)")
    ("quiet,q", po::bool_switch(), "errors only: no progress, no summary (the exit code tells)");
  // clang-format on
}

Console Console::FromOptions(const po::variables_map& vm, int rank) {
  LogLevel level = ParseLogLevel(vm["log-level"].as<std::string>());
  if (vm["quiet"].as<bool>() || rank != 0) level = LogLevel::kError;
  return Console(level, ::isatty(STDERR_FILENO) == 1, stderr);
}

Console::Console(LogLevel level, bool terminal, std::FILE* out)
    : level_(level), terminal_(terminal), out_(out) {}

void Console::Log(LogLevel level, std::string_view message) {
  if (!Shows(level)) return;
  static constexpr const char* kNames[] = {"error", "warning", "info", "debug"};
  const char* name = kNames[static_cast<int>(level)];
  if (terminal_) {
    std::fprintf(out_, "%s: %.*s\n", name, static_cast<int>(message.size()), message.data());
  } else {
    std::fprintf(out_, "%s %s %.*s\n", Timestamp().c_str(), name, static_cast<int>(message.size()),
                 message.data());
  }
  std::fflush(out_);
}

void Console::Result(std::string_view text) const {
  if (Shows(LogLevel::kInfo)) std::cout << text << std::flush;
}

ProgressSink Console::Progress() {
  if (!Shows(LogLevel::kInfo)) return {};
  return [this](const adapter_job::Progress& p) { Show(p); };
}

void Console::Show(const adapter_job::Progress& p) {
  const auto now = Clock::now();
  if (p.stage != stage_) {
    stage_ = p.stage;
    stage_start_ = now;
    last_shown_ = {};
    last_quarter_ = 0;
  }
  const double elapsed = std::chrono::duration<double>(now - stage_start_).count();
  const bool finished = p.done >= p.total;
  std::string figures = fmt::format("{}/{} {}", p.done, p.total, p.unit);
  if (p.bytes_gathered > 0)
    figures += fmt::format(", {} gathered", Megabytes(static_cast<double>(p.bytes_gathered)));
  if (p.tensors > 0) {
    figures += fmt::format(", {} tensors ({}) written", p.tensors,
                           Megabytes(static_cast<double>(p.bytes)));
    if (elapsed > 0) figures += fmt::format(", {}/s", Megabytes(p.bytes / elapsed));
  }
  if (!finished && p.done > 0 && elapsed > 0)
    figures += fmt::format(", ETA {:.1f} s", elapsed / p.done * (p.total - p.done));
  if (finished) figures += fmt::format(", {:.2f} s", elapsed);

  if (terminal_) {
    // Redrawn at most ten times a second, and once at the end.
    if (!finished && now - last_shown_ < std::chrono::milliseconds(100)) return;
    last_shown_ = now;
    constexpr int kWidth = 30;
    const int filled = p.total ? static_cast<int>(kWidth * p.done / p.total) : kWidth;
    std::fprintf(out_, "\r\033[K%-7s [%s%s] %s%s", stage_.c_str(), std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '-').c_str(), figures.c_str(), finished ? "\n" : "");
    std::fflush(out_);
    return;
  }
  // A log gets the start of each quarter, a line every 10 s at most in between, and the end;
  // with --log-level debug, every step.
  const uint64_t quarter = p.total ? 4 * p.done / p.total : 4;
  const bool due =
      finished || quarter > last_quarter_ || now - last_shown_ > std::chrono::seconds(10);
  if (!due && !Shows(LogLevel::kDebug)) return;
  last_quarter_ = quarter;
  last_shown_ = now;
  Log(LogLevel::kInfo, fmt::format("{}: {}", stage_, figures));
}

}  // namespace adapter_job::cli
