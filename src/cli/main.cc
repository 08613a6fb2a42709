#include <boost/program_options/errors.hpp>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "adapter_job/comm/mpi_world.h"
#include "adapter_job/comm/transport.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/signal_cleanup.h"
#include "commands.h"

namespace {

using adapter_job::ExitCode;

constexpr const char* kUsage = R"(usage: adapter_job [command] [options]

commands:
  export         (default) export a Megatron-Bridge LoRA/DoRA checkpoint as a HuggingFace PEFT adapter
  stream         write the HF-named adapter tensors into one safetensors file
  merge          write the base model with the adapter merged in, as HF safetensors shards
  verify         compare a PEFT adapter's logits with the base model and the Megatron merge
  inspect CKPT   list the tensors, shards and PEFT settings of a Megatron torch_dist checkpoint
  version        print versions and the GPUs this process can use

Run under MPI for a distributed export: mpirun -np N adapter_job export ...
Run 'adapter_job <command> --help' for the options of a command.
)";

int Code(ExitCode code) { return static_cast<int>(code); }

// Runs a command and turns failures into one message and an exit code. `rank` prefixes messages
// from ranks other than 0, which otherwise stay silent.
template <typename Command>
int Guarded(const std::string& command, int rank, bool* abort_peers, Command&& run) {
  const std::string who = rank > 0 ? fmt::format("[rank {}] ", rank) : "";
  try {
    return run();
  } catch (const adapter_job::comm::PeerFailure& e) {
    return Code(e.exit_code());  // the failing rank has said why
  } catch (const boost::program_options::error& e) {
    if (rank == 0) std::fprintf(stderr, "adapter_job %s: %s\n", command.c_str(), e.what());
    return Code(ExitCode::kBadInput);
  } catch (const adapter_job::Error& e) {
    std::fprintf(stderr, "%sadapter_job %s: error: %s\n", who.c_str(), command.c_str(), e.what());
    *abort_peers = e.abort_peers();
    return Code(e.exit_code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%sadapter_job %s: internal error: %s\n", who.c_str(), command.c_str(),
                 e.what());
    *abort_peers = true;
    return Code(ExitCode::kInternal);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Before MPI or libtorch start threads: they must inherit the blocked stop signals.
  adapter_job::InstallSignalCleanup();
  std::string command = argc >= 2 ? argv[1] : "";
  if (argc < 2 || command == "--help" || command == "-h") {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? Code(ExitCode::kBadInput) : 0;
  }
  // Options without a command mean `export`, as with Megatron-Bridge's export_adapter.py.
  const bool implicit_export = command.rfind("--", 0) == 0;
  if (implicit_export) command = "export";
  const std::vector<std::string> args(argv + (implicit_export ? 1 : 2), argv + argc);

  bool abort_peers = false;
  if (command == "inspect")
    return Guarded(command, 0, &abort_peers, [&] { return adapter_job::cli::RunInspect(args); });
  if (command == "verify") {
    return Guarded(command, 0, &abort_peers, [&] { return adapter_job::cli::RunVerify(args); });
  }
  if (command == "version" || command == "--version") {
    return Guarded(command, 0, &abort_peers, [&] { return adapter_job::cli::RunVersion(args); });
  }
  if (command != "export" && command != "stream" && command != "merge") {
    std::fprintf(stderr, "adapter_job: unknown command '%s'\n\n%s", command.c_str(), kUsage);
    return Code(ExitCode::kBadInput);
  }

  adapter_job::comm::MpiWorld world(argc, argv);
  const int code = Guarded(command, world.rank(), &abort_peers, [&] {
    if (command == "merge") return adapter_job::cli::RunMerge(world, args);
    return command == "export" ? adapter_job::cli::RunExport(world, args)
                               : adapter_job::cli::RunStream(world, args);
  });
  // Peers blocked in a collective would wait forever for this rank: end them all.
  if (abort_peers && world.size() > 1) world.Abort(code);
  return code;
}
