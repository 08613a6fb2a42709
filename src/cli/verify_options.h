// Verification options shared by `verify` and `export --verify`.
#pragma once

#include <boost/program_options.hpp>

#include "adapter_job/verify/verify.h"

namespace adapter_job::cli {

class Console;

void AddVerifyOptions(boost::program_options::options_description& options);
void ReadVerifyOptions(const boost::program_options::variables_map& vm,
                       verify::VerifyOptions& options);
// Prints the table, writes --verify-h5, and returns the exit code the verdict calls for.
int ReportVerification(const verify::VerificationReport& report,
                       const boost::program_options::variables_map& vm, const Console& console);

}  // namespace adapter_job::cli
