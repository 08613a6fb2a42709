// `torch.save` archives: a zip whose `<prefix>/data.pkl` (pickle protocol 2) rebuilds objects
// from raw storages in `<prefix>/data/<key>`. DCP stores every tensor chunk as one such archive.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "adapter_job/checkpoint/pickle.h"
#include "adapter_job/checkpoint/zip_reader.h"
#include "adapter_job/core/tensor.h"

namespace adapter_job::checkpoint {

// An opened archive: the members and the unpickled, uninterpreted `data.pkl`.
struct TorchSaveArchive {
  ZipArchive zip;
  std::string prefix;  // "archive" for streams, the file stem for files
  pickle::Document pickle;
  bool big_endian = false;
};

TorchSaveArchive OpenTorchSave(std::span<const std::byte> archive);

// Decodes an archive holding exactly one tensor (`_rebuild_tensor_v2`/`_v3`, optionally inside
// `_rebuild_parameter`) into a view of its storage bytes, with dtype, shape, strides and storage
// offset honoured and bounds-checked. The view points into `archive`.
struct DecodedTensor {
  StridedView view;
  bool big_endian = false;
};
DecodedTensor DecodeTorchSaveTensor(const TorchSaveArchive& archive);

// Convenience: a contiguous little-endian copy.
Tensor ReadTorchSaveTensor(std::span<const std::byte> archive);

}  // namespace adapter_job::checkpoint
