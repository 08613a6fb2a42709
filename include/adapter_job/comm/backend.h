// Which transport moves the adapter shards between ranks (comm/transport.h builds it).
#pragma once

#include <string_view>

namespace adapter_job::comm {

// kAuto: NCCL when the ranks span hosts and each drives its own GPU, else MPI.
enum class Backend { kAuto, kMpi, kNccl };
Backend ParseBackend(std::string_view name);  // "auto" | "mpi" | "nccl"
std::string_view BackendName(Backend backend);

}  // namespace adapter_job::comm
