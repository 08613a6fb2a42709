#include "export_result.h"

#include <fmt/format.h>

#include <array>
#include <boost/program_options/errors.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "adapter_job/checkpoint/checkpoint_readiness.h"
#include "adapter_job/checkpoint/integrity.h"
#include "adapter_job/comm/transport.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "adapter_job/writer/output_guard.h"
#include "output_files.h"

namespace adapter_job::cli {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// A result is a few KB plus the export's report; a larger file is not one of ours.
constexpr std::size_t kMaxResultBytes = std::size_t{64} << 20;

double Since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// What the result says besides the outcome.
struct Record {
  ExportCommand command = ExportCommand::kExport;
  fs::path file;           // --result (empty: none asked for)
  std::string checkpoint;  // as given
  std::string output;      // as given
  std::string iteration_dir, iteration, fingerprint;
  Clock::time_point start = Clock::now();
  double wait_seconds = 0;
  double export_seconds = 0;
};

Record RecordOf(const ExportCommandLine& cl) {
  Record r;
  r.command = cl.command;
  r.file = cl.result_path.value_or("");
  r.checkpoint = cl.options.checkpoint.string();
  r.output = cl.options.output.string();
  return r;
}

const Json* Member(const Json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

// A non-empty string member, else `fallback`.
std::string Text(const Json* j, const std::string& fallback) {
  return j && j->is_string() && !j->get_ref<const std::string&>().empty() ? j->get<std::string>()
                                                                          : fallback;
}

// How the messages name the command and what it writes.
const char* CommandName(ExportCommand command) {
  return command == ExportCommand::kMerge ? "merge" : "export";
}
const char* OutputNoun(ExportCommand command) {
  return command == ExportCommand::kMerge ? "merged model" : "adapter";
}
const char* PastTense(ExportCommand command) {
  return command == ExportCommand::kMerge ? "merged" : "exported";
}

// The previous result, or null when there is none that parses (a damaged one counts as none).
Json Load(const fs::path& file) {
  try {
    return Json::parse(ReadTextFile(file, kMaxResultBytes));
  } catch (const std::exception&) {
    return nullptr;
  }
}

// The checkpoint's integrity as the export's report has it.
Json IntegrityOf(const Json& report) {
  const Json* integrity = Member(report, "integrity");
  if (!integrity || !integrity->is_object()) return "not checked";
  const Json* checked = Member(*integrity, "checked");
  if (checked && checked->is_boolean() && checked->get<bool>()) {
    const Json* files = Member(*integrity, "files");
    return fmt::format("verified ({} files)", files ? files->dump() : "None");
  }
  const std::string why = Text(Member(*integrity, "why"), "");
  return why.find("no integrity.json") != std::string::npos ? "absent" : "not checked: " + why;
}

// Why the report does not show a verified adapter; empty when it does.
std::string NotVerified(const Json& report) {
  if (!report.is_object()) return "adapter_job wrote no report";
  const Json* verified = Member(report, "verified");
  if (verified && verified->is_boolean() && verified->get<bool>()) return {};
  return Text(Member(report, "verification_skipped"),
              "the report says verified: false without a reason");
}

void Write(const Record& r, const std::string& status, int code, const std::string& message,
           const Json& report, bool hashed) {
  Json result;
  result["status"] = status;
  result["exit_code"] = code;
  result["message"] = message;
  Json integrity = IntegrityOf(report);
  std::string why;
  bool verified = false;
  if (status == "skipped") {  // what the run that made the adapter found
    const Json before = Load(r.file);
    const Json* was = Member(before, "verified");
    verified = was && was->is_boolean() && was->get<bool>();
    why = Text(Member(before, "verification_skipped"),
               "the earlier result does not say it was verified");
    const Json* checkpoint = Member(before, "checkpoint");
    if (const Json* found = checkpoint ? Member(*checkpoint, "integrity") : nullptr) {
      integrity = *found;
    }
  } else if (code == 0) {
    why = NotVerified(report);
    verified = why.empty();
  }
  result["verified"] = verified;
  if (!verified && !why.empty()) result["verification_skipped"] = why;
  result["checkpoint"] = {{"path", r.checkpoint},
                          {"iteration_dir", r.iteration_dir},
                          {"iteration", r.iteration},
                          {"integrity", integrity},
                          {"fingerprint", r.fingerprint}};
  result["output"] = r.output;
  result["files"] = Json::object();
  // Recorded before the seconds: a merged model adds "weights" next to "files".
  if (hashed) {
    const Json recorded = RecordOutputFiles(r.command, r.output, report);
    for (const auto& [key, value] : recorded.items()) result[key] = value;
  }
  result["seconds"] = {
      {"wait", r.wait_seconds}, {"export", r.export_seconds}, {"total", Since(r.start)}};
  result["export"] = report;
  // Paths are bytes; a name that is not UTF-8 is written with U+FFFD rather than not at all.
  const std::string text = result.dump(2, ' ', false, Json::error_handler_t::replace) + "\n";
  OutputFile out = OutputFile::Create(r.file, /*overwrite=*/true);
  out.Write(text);
  std::move(out).Commit();
}

// On rank 0, when a result was asked for. Never throws: the outcome (the exit code) stands, and a
// result that cannot be written is said, as the hook did.
void TryWrite(const comm::MpiWorld& world, const Record& r, const std::string& status, int code,
              const std::string& message, const Json& report = nullptr, bool hashed = false) {
  if (world.rank() != 0 || r.file.empty()) return;
  try {
    Write(r, status, code, message, report, hashed);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "adapter_job %s: warning: cannot write the result file '%s': %s\n",
                 CommandName(r.command), r.file.c_str(), e.what());
  }
}

// The earlier result records a success for this checkpoint, and `output` still holds the files it
// records, as recorded.
bool AlreadyExported(const Record& r) {
  std::error_code ec;
  if (!fs::is_directory(r.output, ec) || !fs::is_regular_file(r.file, ec)) return false;
  const Json before = Load(r.file);
  const Json* code = Member(before, "exit_code");
  const Json* checkpoint = Member(before, "checkpoint");
  const Json* fingerprint = checkpoint ? Member(*checkpoint, "fingerprint") : nullptr;
  return code && code->is_number() && *code == 0 && fingerprint && *fingerprint == r.fingerprint &&
         OutputUnchanged(r.command, r.output, before);
}

}  // namespace

int RunRecordedExport(
    const comm::MpiWorld& world, const ExportCommandLine& cl, Console& console,
    const ExportOptions& given,
    const std::function<int(const ExportOptions&, std::optional<ExportReport>&)>& export_body) {
  std::optional<ExportReport> report;
  if (!cl.wait && !cl.result_path) return export_body(given, report);
  Record r = RecordOf(cl);
  const bool rank0 = world.rank() == 0;
  try {
    ExportOptions options = given;
    checkpoint::CheckpointLocation location;
    // Every rank waits (none spins in a collective for an hour); they agree on the outcome.
    comm::RunAgreed(world, [&] {
      // The export is pinned to the iteration directory below: the save directory given is
      // guarded here.
      writer::RefuseOutputsOverInputs({{"--output-hf-path", options.output}, {"--result", r.file}},
                                      {{"--megatron-peft-checkpoint", options.checkpoint}});
      if (cl.wait) {
        checkpoint::WaitSettings settings = *cl.wait;
        if (rank0) {
          settings.on_wait = [&](std::string_view why) {
            console.Log(LogLevel::kInfo, fmt::format("waiting: {}", why));
          };
        }
        location = checkpoint::WaitForCheckpoint(options.checkpoint, settings).location;
      } else {
        location = checkpoint::ResolveCheckpoint(options.checkpoint);
      }
    });
    r.wait_seconds = Since(r.start);
    // Rank 0's iteration for every rank, and for the verification: a newer one that training
    // saves meanwhile is not half read.
    r.iteration_dir = comm::FirstNonEmpty(world, rank0 ? location.iteration_dir.string() : "");
    r.iteration = location.label;
    options.checkpoint = r.iteration_dir;

    std::string skip;
    comm::RunAgreed(world, [&] {
      if (!rank0 || r.file.empty()) return;
      r.fingerprint = checkpoint::CheckpointFingerprint(r.iteration_dir);
      if (AlreadyExported(r)) {
        skip = "skip";
      } else if (std::error_code ec; !options.overwrite && fs::exists(options.output, ec)) {
        Fail("{} exists and was not made from this checkpoint ({} to replace it)", r.output,
             cl.overwrite_hint);
      }
    });
    if (comm::FirstNonEmpty(world, skip) == "skip") {
      const std::string message = fmt::format("the {} in {} already matches this checkpoint",
                                              OutputNoun(r.command), r.output);
      if (rank0) console.Log(LogLevel::kInfo, message);
      TryWrite(world, r, "skipped", 0, message, nullptr, /*hashed=*/true);
      return 0;
    }

    const auto export_start = Clock::now();
    int code = 0;
    try {
      code = export_body(options, report);
    } catch (...) {
      r.export_seconds = Since(export_start);
      throw;
    }
    r.export_seconds = Since(export_start);
    const Json report_json = report && rank0 ? Json(report->ToJson()) : Json(nullptr);
    if (code == 0) {
      const std::string why = NotVerified(report_json);
      // "exported" for a merge too: the hook's callers key on the status.
      TryWrite(world, r, "exported", 0,
               why.empty() ? fmt::format("{} and verified {}", PastTense(r.command), r.output)
                           : fmt::format("{} {}; verification skipped: {}", PastTense(r.command),
                                         r.output, why),
               report_json, /*hashed=*/true);
    } else if (code == static_cast<int>(ExitCode::kVerificationFailed)) {
      TryWrite(world, r, "failed", code,
               fmt::format("verification failed: the {} is in {}{}, {} is unchanged",
                           OutputNoun(r.command), r.output, kUnverifiedSuffix, r.output),
               report_json);
    } else {
      TryWrite(world, r, "failed", code,
               fmt::format("adapter_job {} exited {}", CommandName(r.command), code), report_json);
    }
    return code;
  } catch (const comm::PeerFailure& e) {
    TryWrite(world, r, "failed", static_cast<int>(e.exit_code()),
             fmt::format("{} (its message is in the job's log)", e.what()));
    throw;
  } catch (const Error& e) {
    TryWrite(world, r, "failed", static_cast<int>(e.exit_code()), e.what());
    throw;
  } catch (const boost::program_options::error& e) {
    TryWrite(world, r, "failed", static_cast<int>(ExitCode::kBadInput), e.what());
    throw;
  } catch (const std::exception& e) {
    TryWrite(world, r, "failed", static_cast<int>(ExitCode::kInternal),
             fmt::format("internal error: {}", e.what()));
    throw;
  }
}

int RecordWithoutExport(const comm::MpiWorld& world, const ExportCommandLine& cl) {
  const Record r = RecordOf(cl);
  const int code = cl.record_failure ? cl.record_failure_code : 2;
  const std::string message = cl.record_failure.value_or(fmt::format(
      "--help or --print-config (on the command line or in a --config file) prints instead of "
      "{}: adapter_job {} {} nothing",
      r.command == ExportCommand::kMerge ? "merging" : "exporting", CommandName(r.command),
      PastTense(r.command)));
  if (world.rank() == 0) {
    std::fprintf(stderr, "adapter_job %s: error: %s\n", CommandName(r.command), message.c_str());
  }
  TryWrite(world, r, "failed", code, message);
  return code;
}

void RecordUnparsed(const comm::MpiWorld& world, ExportCommand command,
                    const std::vector<std::string>& args, int code, const std::string& message) {
  Record r;
  r.command = command;
  // As written on the command line; the first of each (the parse failed, maybe on a repeat).
  const auto take = [&](std::size_t& i, const std::string& name, std::string& value) {
    const std::string& arg = args[i];
    if (!value.empty()) return;
    if (arg == name && i + 1 < args.size()) {
      value = args[++i];
    } else if (arg.rfind(name + "=", 0) == 0) {
      value = arg.substr(name.size() + 1);
    }
  };
  std::string file;
  for (std::size_t i = 0; i < args.size(); ++i) {
    take(i, "--result", file);
    take(i, "--megatron-peft-checkpoint", r.checkpoint);
    take(i, "--output-hf-path", r.output);
  }
  r.file = file;
  TryWrite(world, r, "failed", code, message);
}

}  // namespace adapter_job::cli
