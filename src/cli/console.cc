#include "console.h"

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <unistd.h>

#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>

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
    ("quiet,q", po::bool_switch(), "errors only: no progress, no summary (the exit code tells)")
    ("progress", po::value<std::string>()->default_value("auto"),
     "auto (a bar on a terminal, lines elsewhere) | bar (also when stderr is a pipe, as under "
     "mpirun) | lines | json (one object per step: stage, done, total, bytes, rate, eta, rank) "
     "| none");
  // clang-format on
}

Console Console::FromOptions(const po::variables_map& vm, int rank) {
  LogLevel level = ParseLogLevel(vm["log-level"].as<std::string>());
  if (vm["quiet"].as<bool>() || rank != 0) level = LogLevel::kError;
  const bool terminal = ::isatty(STDERR_FILENO) == 1;
  const std::string progress = vm.count("progress") ? vm["progress"].as<std::string>() : "auto";
  ProgressStyle style = terminal ? ProgressStyle::kBar : ProgressStyle::kLines;
  if (progress == "bar") {
    style = ProgressStyle::kBar;
  } else if (progress == "lines") {
    style = ProgressStyle::kLines;
  } else if (progress == "json") {
    style = ProgressStyle::kJson;
  } else if (progress == "none") {
    style = ProgressStyle::kNone;
  } else if (progress != "auto") {
    Fail("--progress must be auto, bar, lines, json or none, not '{}'", progress);
  }
  return Console(level, terminal, stderr, style);
}

Console::Console(LogLevel level, bool terminal, std::FILE* out, ProgressStyle style)
    : level_(level), terminal_(terminal), style_(style), out_(out) {}

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
  if (!Shows(LogLevel::kInfo) || style_ == ProgressStyle::kNone) return {};
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
  if (style_ == ProgressStyle::kJson) return ShowJson(p, elapsed);
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

  if (style_ == ProgressStyle::kBar) {
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
  // with --log-level debug, every step, the ones only it shows labelled debug.
  const uint64_t quarter = p.total ? 4 * p.done / p.total : 4;
  const bool due =
      finished || quarter > last_quarter_ || now - last_shown_ > std::chrono::seconds(10);
  if (!due && !Shows(LogLevel::kDebug)) return;
  if (due) {
    last_quarter_ = quarter;
    last_shown_ = now;
  }
  Log(due ? LogLevel::kInfo : LogLevel::kDebug, fmt::format("{}: {}", stage_, figures));
}

// One line of JSON per step, every step: what a scheduler parses (only rank 0 reports progress).
void Console::ShowJson(const adapter_job::Progress& p, double elapsed) {
  const bool finished = p.done >= p.total;
  nlohmann::ordered_json event = {{"event", "progress"},
                                  {"time", Timestamp()},
                                  {"rank", 0},
                                  {"stage", stage_},
                                  {"done", p.done},
                                  {"total", p.total},
                                  {"unit", std::string(p.unit)},
                                  {"bytes_gathered", p.bytes_gathered},
                                  {"tensors", p.tensors},
                                  {"bytes", p.bytes},
                                  {"elapsed_s", elapsed}};
  event["bytes_per_s"] = elapsed > 0
                             ? nlohmann::ordered_json(static_cast<double>(p.bytes) / elapsed)
                             : nlohmann::ordered_json();
  event["eta_s"] = finished ? nlohmann::ordered_json(0.0)
                   : p.done > 0 && elapsed > 0
                       ? nlohmann::ordered_json(elapsed / static_cast<double>(p.done) *
                                                static_cast<double>(p.total - p.done))
                       : nlohmann::ordered_json();
  std::fprintf(out_, "%s\n", event.dump().c_str());
  std::fflush(out_);
}

}  // namespace adapter_job::cli
