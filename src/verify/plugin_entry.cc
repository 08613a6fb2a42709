// The verification plugin's one exported symbol. Exceptions never cross the library boundary:
// they travel back as an exit code and a message.
#include "adapter_job/core/error.h"
#include "adapter_job/verify/verify.h"

extern "C" __attribute__((visibility("default"))) int adapter_job_verify_v1(
    const adapter_job::verify::VerifyOptions* options,
    adapter_job::verify::VerificationReport* report, std::string* error) {
  try {
    *report = adapter_job::verify::Verify(*options);
    return 0;
  } catch (const adapter_job::Error& e) {
    *error = e.what();
    return static_cast<int>(e.exit_code());
  } catch (const std::exception& e) {
    *error = std::string("internal error in verification: ") + e.what();
    return static_cast<int>(adapter_job::ExitCode::kInternal);
  }
}
