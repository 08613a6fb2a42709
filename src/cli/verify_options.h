// Verification options shared by `verify` and `export --verify`.
#pragma once

#include <boost/program_options.hpp>
#include <string_view>

#include "adapter_job/verify/verify.h"

namespace adapter_job::cli {

class Console;

void AddVerifyOptions(boost::program_options::options_description& options);
void ReadVerifyOptions(const boost::program_options::variables_map& vm,
                       verify::VerifyOptions& options);
// Prints the table, writes --verify-h5, and returns the exit code the verdict calls for. A failed
// verdict is also logged as an error, one line naming the failed checks and then `consequence`.
int ReportVerification(const verify::VerificationReport& report,
                       const boost::program_options::variables_map& vm, Console& console,
                       std::string_view consequence = "");

}  // namespace adapter_job::cli
