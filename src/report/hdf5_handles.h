// Owners for HDF5 C API identifiers, private to src/verify: the HDF5 headers stay out of the
// public interface, so users of the report library need no HDF5 include path.
#pragma once

#include <hdf5.h>

#include <utility>

namespace adapter_job::verify::hdf5 {

// A move-only owner of one identifier of one kind. Each kind has its own close function (an
// identifier closed with the wrong one leaks), hence one type per kind below.
template <herr_t (*kClose)(hid_t)>
class Handle {
 public:
  Handle() = default;
  explicit Handle(hid_t id) : id_(id) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  Handle(Handle&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)) {}
  Handle& operator=(Handle&& other) noexcept {
    if (this != &other) {
      Release();
      id_ = std::exchange(other.id_, H5I_INVALID_HID);
    }
    return *this;
  }
  // Closing while unwinding from an error: a second failure could only hide the first.
  ~Handle() { Release(); }

  hid_t get() const { return id_; }

  // Closes now and returns the status the destructor would ignore. A file's close writes its
  // metadata, so its failure means the file is incomplete.
  herr_t Close() {
    const hid_t id = std::exchange(id_, H5I_INVALID_HID);
    return id >= 0 ? kClose(id) : 0;
  }

 private:
  void Release() noexcept {
    if (id_ >= 0) kClose(id_);
    id_ = H5I_INVALID_HID;
  }

  hid_t id_ = H5I_INVALID_HID;
};

using File = Handle<H5Fclose>;
using Group = Handle<H5Gclose>;
using Dataset = Handle<H5Dclose>;
using Dataspace = Handle<H5Sclose>;
using Datatype = Handle<H5Tclose>;
using Attribute = Handle<H5Aclose>;
using PropertyList = Handle<H5Pclose>;

// Stops HDF5 from printing its error stack to stderr for as long as it lives: failures are
// turned into exceptions carrying the same messages, and a report writer that also scribbles a
// thirty-line trace on every rank's stderr buries the one line that matters.
class SilenceErrorPrinting {
 public:
  SilenceErrorPrinting() {
    H5Eget_auto2(H5E_DEFAULT, &saved_function_, &saved_data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  SilenceErrorPrinting(const SilenceErrorPrinting&) = delete;
  SilenceErrorPrinting& operator=(const SilenceErrorPrinting&) = delete;
  ~SilenceErrorPrinting() { H5Eset_auto2(H5E_DEFAULT, saved_function_, saved_data_); }

 private:
  H5E_auto2_t saved_function_ = nullptr;
  void* saved_data_ = nullptr;
};

}  // namespace adapter_job::verify::hdf5
