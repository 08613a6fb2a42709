// What --result records of a published output, so that a later run on the same checkpoint can
// tell the output is still the one it made and skip the work.
//
// Small files are recorded by sha256. The weights shards of a merged model are recorded by size
// and modification time instead: re-hashing a 140 GB model on every hook run would cost minutes,
// and the shards are written by this tool alone and published by one rename, so a shard changed
// afterwards shows in its size or mtime (the quick check make and rsync rely on). The shard list
// itself is covered: the index that names the shards is a small file, hashed.
#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>

#include "export_options.h"

namespace adapter_job::cli {

// {"files": {name: sha256}} for an adapter; a merged model adds {"weights": {name: {"bytes",
// "modified_ns"}}} for its *.safetensors. `report` is the export's report (ExportReport::ToJson,
// or null): a file its provenance already hashed while staged, and that still has the size it
// recorded, takes that digest instead of being read again (the same bytes, renamed). Throws
// IoError when a file cannot be read.
nlohmann::ordered_json RecordOutputFiles(ExportCommand command, const std::filesystem::path& output,
                                         const nlohmann::ordered_json& report);

// Whether `output` still holds every file `recorded` (a result's members, as above) lists, as
// listed, and `recorded` lists what `command` writes. False, never a throw, for a file gone.
bool OutputUnchanged(ExportCommand command, const std::filesystem::path& output,
                     const nlohmann::ordered_json& recorded);

}  // namespace adapter_job::cli
