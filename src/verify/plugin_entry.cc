// The verification plugin's exported entry points (verify.h). Exceptions never cross the library
// boundary: they travel back as an exit code and a message.
#include <c10/util/Exception.h>

#include <string>

#include "adapter_job/core/error.h"
#include "adapter_job/verify/verify.h"

namespace {

using adapter_job::ExitCode;

// libtorch's own message, without the C++ backtrace it appends (a person needs the first line).
std::string Message(const c10::Error& e) {
  std::string text = e.what_without_backtrace();
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

// libtorch errors by kind: memory and device failures are the machine's (4); anything else it
// refuses comes from inputs that passed our own checks but do not fit together (2). None is
// reported as a bug of ours (1): the inputs decide, and the message says which operation failed.
int ReportTorchError(const c10::Error& e, std::string* error) {
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr) {
    *error = "verification ran out of device memory: " + Message(e) +
             " (verify on the CPU with --verify-device cpu, or free the device)";
    return static_cast<int>(ExitCode::kInfrastructure);
  }
  if (dynamic_cast<const c10::AcceleratorError*>(&e) != nullptr) {
    *error = "the accelerator failed during verification: " + Message(e);
    return static_cast<int>(ExitCode::kInfrastructure);
  }
  *error =
      "libtorch refused the verification inputs (the base model, adapter and checkpoint do "
      "not fit together): " +
      Message(e);
  return static_cast<int>(ExitCode::kBadInput);
}

// Runs `body`, turning every exception into an exit code and `error`.
template <typename Body>
int Guarded(std::string* error, const Body& body) {
  try {
    body();
    return 0;
  } catch (const adapter_job::Error& e) {
    *error = e.what();
    return static_cast<int>(e.exit_code());
  } catch (const c10::Error& e) {
    return ReportTorchError(e, error);
  } catch (const std::bad_alloc&) {
    *error = "verification ran out of host memory";
    return static_cast<int>(ExitCode::kInfrastructure);
  } catch (const std::exception& e) {
    *error = std::string("internal error in verification: ") + e.what();
    return static_cast<int>(ExitCode::kInternal);
  }
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int adapter_job_verify_v1(
    const adapter_job::verify::VerifyOptions* options,
    adapter_job::verify::VerificationReport* report, std::string* error) {
  return Guarded(error, [&] { *report = adapter_job::verify::Verify(*options); });
}

extern "C" __attribute__((visibility("default"))) int adapter_job_preview_verification_v1(
    const adapter_job::verify::VerifyOptions* options,
    adapter_job::verify::VerificationPreview* preview, std::string* error) {
  return Guarded(error, [&] { *preview = adapter_job::verify::PreviewVerification(*options); });
}
