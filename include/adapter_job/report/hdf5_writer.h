// verification.h5: the report with every variant's full logits, for analysis with h5py. Part of
// the verification plugin's build (ADAPTER_JOB_VERIFY), the only code that links HDF5; the
// exporter and library users write it through verify::WriteHdf5WithPlugin (verify/plugin.h).
#pragma once

#include <filesystem>

#include "adapter_job/report/report.h"

namespace adapter_job::verify {

// verification.h5, laid out as README.md ("verification.h5") documents: /prompts/<i>/{token_ids,
// logits/<variant>, top_k/<variant>/{ids, logits, probabilities, text}} with the prompt text as an
// attribute; /checks/{name, passed, figure, threshold, relation, detail}; /adapter_tensors/{name,
// dtype, shape, mean, std, max_abs, frobenius_norm}; root attributes base_model, adapter_path,
// device, compute_dtype, top_k, passed, seconds. Written to a temporary file and renamed.
void WriteHdf5(const VerificationReport& report, const std::filesystem::path& path);

}  // namespace adapter_job::verify
