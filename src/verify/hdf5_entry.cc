// The plugin's entry point for verification.h5: HDF5 is linked here only. Exceptions never cross
// the library boundary; they travel back as an exit code and a message.
#include <new>
#include <string>
#include <type_traits>

#include "adapter_job/core/error.h"
#include "adapter_job/report/hdf5_writer.h"
#include "adapter_job/verify/verify.h"

extern "C" __attribute__((visibility("default"))) int adapter_job_write_hdf5_v1(
    const adapter_job::verify::VerificationReport* report, const std::filesystem::path* path,
    std::string* error) {
  static_assert(
      std::is_same_v<decltype(&adapter_job_write_hdf5_v1), adapter_job::verify::Hdf5Entry>);
  try {
    adapter_job::verify::WriteHdf5(*report, *path);
    return 0;
  } catch (const adapter_job::Error& e) {
    *error = e.what();
    return static_cast<int>(e.exit_code());
  } catch (const std::bad_alloc&) {
    *error = "writing verification.h5 ran out of host memory";
    return static_cast<int>(adapter_job::ExitCode::kInfrastructure);
  } catch (const std::exception& e) {
    *error = std::string("internal error writing verification.h5: ") + e.what();
    return static_cast<int>(adapter_job::ExitCode::kInternal);
  }
}
