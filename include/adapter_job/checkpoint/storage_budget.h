// Holds what the .metadata declares to what the shard files can hold, before anything is
// allocated for it: a few hostile bytes of .metadata must not make the export allocate terabytes.
#pragma once

#include <filesystem>

#include "adapter_job/checkpoint/adapter_layout.h"
#include "adapter_job/checkpoint/dcp_metadata.h"

namespace adapter_job::checkpoint {

// Throws FormatError naming the key and the file unless every adapter chunk of `layout`
// - declares no more bytes than its storage range holds (torch.save stores a chunk's elements
//   uncompressed, so its payload is at least that long),
// - lies inside its shard file in `dir` (which must exist), and
// - owns its range: no two chunks share bytes of a file, as torch's DCP writer never writes them.
// Together these bound the bytes that layout's buffers take by the shard files' sizes.
void CheckDeclaredBytes(const AdapterLayout& layout, const DcpMetadata& metadata,
                        const std::filesystem::path& dir);

}  // namespace adapter_job::checkpoint
