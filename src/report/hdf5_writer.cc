// verification.h5: the full logits and everything else in the report, for analysis with h5py.
//
// Layout (every object is always present; an empty list gives zero-length datasets):
//   attributes of /       base_model, adapter_path, device, compute_dtype: UTF-8 strings
//                         top_k: int64; passed: uint8 (0 or 1); seconds: float64
//   /prompts/<i>          one group per prompt, i = 0, 1, ... (h5py lists "10" before "2":
//                         iterate over range(len(f["prompts"])))
//     attribute prompt    UTF-8 string, empty when the prompt was given as token ids
//     token_ids           int64 [T]
//     logits/<variant>    float32, VariantLogits::shape (normally [T, vocab]), one per variant
//     top_k/<variant>/    ids int64 [k], logits float32 [k], probabilities float32 [k],
//                         text UTF-8 strings [k]; best first
//   /checks/              name, relation, detail: UTF-8 strings [n]; passed uint8 [n];
//                         figure, threshold float64 [n]
//   /adapter_tensors/     name, dtype: UTF-8 strings [n]; shape: variable-length int64 [n]
//                         (h5py gives an array per tensor: list(f["adapter_tensors/shape"][i]));
//                         mean, std, max_abs, frobenius_norm float64 [n]
// Strings are variable-length, UTF-8 tagged, stored with their bytes unchanged (h5py: .asstr()
// on datasets, plain str from attributes); as C strings they end at a NUL byte. Numbers are
// little-endian, uncompressed, contiguous.
#include "adapter_job/report/hdf5_writer.h"

#include <set>
#include <string_view>

#include "adapter_job/core/checked_math.h"
#include "adapter_job/core/error.h"
#include "adapter_job/core/file.h"
#include "hdf5_handles.h"

namespace adapter_job::verify {
namespace {

namespace h5 = hdf5;

// The innermost and outermost messages on HDF5's error stack, e.g. "unable to create file
// (unable to open file: name = '...', errno = 2, error message = 'No such file or directory',
// ...)"; clears the stack.
std::string TakeHdf5Error() {
  std::vector<std::string> messages;  // from the API call down to where the error arose
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* error, void* data) -> herr_t {
        static_cast<std::vector<std::string>*>(data)->push_back(error->desc ? error->desc : "");
        return 0;
      },
      &messages);
  H5Eclear2(H5E_DEFAULT);
  if (messages.empty()) return "HDF5 gave no reason";
  if (messages.size() == 1) return messages.front();
  return fmt::format("{} ({})", messages.front(), messages.back());
}

// The file being written and how errors name it: by the final path that the user asked for,
// not by the temporary one.
struct Target {
  hid_t file = H5I_INVALID_HID;
  std::string name;
};

// Turns a failed HDF5 call (a negative identifier or status) into an IoError naming the file
// and the object, e.g. "cannot write 'v.h5': cannot create dataset '/checks/name': ...".
template <typename Status>
Status Check(Status status, const Target& target, std::string_view action,
             std::string_view object) {
  if (status < 0) {
    Fail<IoError>("cannot write '{}': cannot {} {}: {}", target.name, action, object,
                  TakeHdf5Error());
  }
  return status;
}

template <typename T>
struct NumberType;
template <>
struct NumberType<int64_t> {
  static hid_t Memory() { return H5T_NATIVE_INT64; }
  static hid_t File() { return H5T_STD_I64LE; }
};
template <>
struct NumberType<uint8_t> {
  static hid_t Memory() { return H5T_NATIVE_UINT8; }
  static hid_t File() { return H5T_STD_U8LE; }
};
template <>
struct NumberType<float> {
  static hid_t Memory() { return H5T_NATIVE_FLOAT; }
  static hid_t File() { return H5T_IEEE_F32LE; }
};
template <>
struct NumberType<double> {
  static hid_t Memory() { return H5T_NATIVE_DOUBLE; }
  static hid_t File() { return H5T_IEEE_F64LE; }
};

std::string DatasetName(const std::string& path) { return fmt::format("dataset '{}'", path); }

std::string AttributeName(const std::string& object, const char* name) {
  return fmt::format("attribute '{}' of '{}'", name, object);
}

// Rank 0 is a scalar; a zero dimension gives an empty dataset.
h5::Dataspace MakeSpace(const Target& target, const std::vector<hsize_t>& dims,
                        std::string_view object) {
  const hid_t id = dims.empty()
                       ? H5Screate(H5S_SCALAR)
                       : H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  return h5::Dataspace(Check(id, target, "create the dataspace of", object));
}

h5::Datatype Utf8StringType(const Target& target, std::string_view object) {
  h5::Datatype type(Check(H5Tcopy(H5T_C_S1), target, "create the string type of", object));
  Check(H5Tset_size(type.get(), H5T_VARIABLE), target, "size the string type of", object);
  Check(H5Tset_cset(type.get(), H5T_CSET_UTF8), target, "set the character set of", object);
  return type;
}

void CreateGroup(const Target& target, const std::string& path) {
  const std::string object = fmt::format("group '{}'", path);
  h5::Group group(
      Check(H5Gcreate2(target.file, path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), target,
            "create", object));
  Check(group.Close(), target, "close", object);
}

// Creates dataset `path` and writes `data` (laid out as `memory_type`) into it.
void WriteDataset(const Target& target, const std::string& path, hid_t file_type, hid_t memory_type,
                  const std::vector<hsize_t>& dims, const void* data, std::size_t count) {
  const std::string object = DatasetName(path);
  const h5::Dataspace space = MakeSpace(target, dims, object);
  h5::Dataset dataset(Check(H5Dcreate2(target.file, path.c_str(), file_type, space.get(),
                                       H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                            target, "create", object));
  // A zero-length dataset needs no write, and HDF5 rejects the null buffer of an empty vector.
  if (count > 0) {
    Check(H5Dwrite(dataset.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), target,
          "write", object);
  }
  Check(dataset.Close(), target, "close", object);
}

template <typename T>
void WriteNumbers(const Target& target, const std::string& path, const std::vector<T>& values,
                  const std::vector<hsize_t>& dims) {
  WriteDataset(target, path, NumberType<T>::File(), NumberType<T>::Memory(), dims, values.data(),
               values.size());
}

template <typename T>
void WriteNumbers(const Target& target, const std::string& path, const std::vector<T>& values) {
  WriteNumbers(target, path, values, {values.size()});
}

void WriteStrings(const Target& target, const std::string& path,
                  const std::vector<std::string>& values) {
  std::vector<const char*> pointers;
  pointers.reserve(values.size());
  for (const auto& value : values) pointers.push_back(value.c_str());
  const h5::Datatype type = Utf8StringType(target, DatasetName(path));
  WriteDataset(target, path, type.get(), type.get(), {values.size()}, pointers.data(),
               pointers.size());
}

// One variable-length int64 sequence per tensor: h5py reads each as a numpy array, which a
// JSON string per tensor would make every reader parse.
void WriteShapes(const Target& target, const std::string& path,
                 const std::vector<std::vector<int64_t>>& shapes) {
  const std::string object = DatasetName(path);
  const h5::Datatype memory_type(
      Check(H5Tvlen_create(H5T_NATIVE_INT64), target, "create the type of", object));
  const h5::Datatype file_type(
      Check(H5Tvlen_create(H5T_STD_I64LE), target, "create the type of", object));
  std::vector<hvl_t> rows;
  rows.reserve(shapes.size());
  for (const auto& shape : shapes) {
    rows.push_back({shape.size(), const_cast<int64_t*>(shape.data())});
  }
  WriteDataset(target, path, file_type.get(), memory_type.get(), {rows.size()}, rows.data(),
               rows.size());
}

void WriteAttribute(const Target& target, const std::string& object_path, const char* name,
                    hid_t file_type, hid_t memory_type, const void* value) {
  const std::string object = AttributeName(object_path, name);
  const h5::Dataspace space = MakeSpace(target, {}, object);
  h5::Attribute attribute(
      Check(H5Acreate_by_name(target.file, object_path.c_str(), name, file_type, space.get(),
                              H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
            target, "create", object));
  Check(H5Awrite(attribute.get(), memory_type, value), target, "write", object);
  Check(attribute.Close(), target, "close", object);
}

void WriteStringAttribute(const Target& target, const std::string& object_path, const char* name,
                          const std::string& value) {
  const h5::Datatype type = Utf8StringType(target, AttributeName(object_path, name));
  const char* pointer = value.c_str();
  WriteAttribute(target, object_path, name, type.get(), type.get(), &pointer);
}

template <typename T>
void WriteNumberAttribute(const Target& target, const std::string& object_path, const char* name,
                          T value) {
  WriteAttribute(target, object_path, name, NumberType<T>::File(), NumberType<T>::Memory(), &value);
}

// One field of every item, as a dataset's values.
template <typename T, typename Item, typename Field>
std::vector<T> Column(const std::vector<Item>& items, Field field) {
  std::vector<T> column;
  column.reserve(items.size());
  for (const auto& item : items) column.push_back(static_cast<T>(field(item)));
  return column;
}

void WriteTopK(const Target& target, const std::string& group, const VariantTopK& top_k) {
  CreateGroup(target, group);
  const auto& tokens = top_k.tokens;
  WriteNumbers(target, group + "/ids", Column<int64_t>(tokens, [](auto& t) { return t.id; }));
  WriteNumbers(target, group + "/logits", Column<float>(tokens, [](auto& t) { return t.logit; }));
  WriteNumbers(target, group + "/probabilities",
               Column<float>(tokens, [](auto& t) { return t.probability; }));
  WriteStrings(target, group + "/text",
               Column<std::string>(tokens, [](auto& t) { return t.text; }));
}

void WritePrompt(const Target& target, std::size_t index, const PromptResult& prompt) {
  const std::string group = fmt::format("/prompts/{}", index);
  CreateGroup(target, group);
  WriteStringAttribute(target, group, "prompt", prompt.prompt);
  WriteNumbers(target, group + "/token_ids", prompt.token_ids);
  CreateGroup(target, group + "/logits");
  for (const auto& logits : prompt.logits) {
    const std::vector<hsize_t> dims(logits.shape.begin(), logits.shape.end());
    WriteNumbers(target, group + "/logits/" + logits.variant, logits.values, dims);
  }
  CreateGroup(target, group + "/top_k");
  for (const auto& top_k : prompt.top_k) {
    WriteTopK(target, group + "/top_k/" + top_k.variant, top_k);
  }
}

void WriteChecks(const Target& target, const std::vector<CheckResult>& checks) {
  CreateGroup(target, "/checks");
  WriteStrings(target, "/checks/name", Column<std::string>(checks, [](auto& c) { return c.name; }));
  // uint8 rather than HDF5's enum-based booleans: h5py and every other reader take it as is.
  WriteNumbers(target, "/checks/passed",
               Column<uint8_t>(checks, [](auto& c) { return c.passed ? 1 : 0; }));
  WriteNumbers(target, "/checks/figure", Column<double>(checks, [](auto& c) { return c.figure; }));
  WriteNumbers(target, "/checks/threshold",
               Column<double>(checks, [](auto& c) { return c.threshold; }));
  WriteStrings(target, "/checks/relation",
               Column<std::string>(checks, [](auto& c) { return c.relation; }));
  WriteStrings(target, "/checks/detail",
               Column<std::string>(checks, [](auto& c) { return c.detail; }));
}

void WriteAdapterTensors(const Target& target, const std::vector<TensorStat>& stats) {
  const std::string group = "/adapter_tensors";
  CreateGroup(target, group);
  WriteStrings(target, group + "/name", Column<std::string>(stats, [](auto& s) { return s.name; }));
  WriteShapes(target, group + "/shape",
              Column<std::vector<int64_t>>(stats, [](auto& s) { return s.shape; }));
  WriteStrings(target, group + "/dtype",
               Column<std::string>(stats, [](auto& s) { return s.dtype; }));
  WriteNumbers(target, group + "/mean", Column<double>(stats, [](auto& s) { return s.mean; }));
  WriteNumbers(target, group + "/std", Column<double>(stats, [](auto& s) { return s.std; }));
  WriteNumbers(target, group + "/max_abs",
               Column<double>(stats, [](auto& s) { return s.max_abs; }));
  WriteNumbers(target, group + "/frobenius_norm",
               Column<double>(stats, [](auto& s) { return s.frobenius_norm; }));
}

void WriteContents(const Target& target, const VerificationReport& report) {
  WriteStringAttribute(target, "/", "base_model", report.base_model);
  WriteStringAttribute(target, "/", "adapter_path", report.adapter_path);
  WriteStringAttribute(target, "/", "device", report.device);
  WriteStringAttribute(target, "/", "compute_dtype", report.compute_dtype);
  WriteNumberAttribute<int64_t>(target, "/", "top_k", report.top_k);
  WriteNumberAttribute<uint8_t>(target, "/", "passed", report.passed() ? 1 : 0);
  WriteNumberAttribute<double>(target, "/", "seconds", report.seconds);
  CreateGroup(target, "/prompts");
  for (std::size_t i = 0; i < report.prompts.size(); ++i) {
    WritePrompt(target, i, report.prompts[i]);
  }
  WriteChecks(target, report.checks);
  WriteAdapterTensors(target, report.adapter_tensors);
}

// A variant names an HDF5 link, so it cannot hold '/' or be "." (or empty), and must be unique.
void CheckVariantName(const std::filesystem::path& path, std::size_t prompt,
                      const std::string& variant, std::set<std::string>& seen) {
  if (variant.empty() || variant == "." || variant.find('/') != std::string::npos) {
    Fail<Error>(
        "cannot write '{}': prompt {} has a variant named '{}', which cannot name an HDF5 "
        "object",
        path.string(), prompt, variant);
  }
  if (!seen.insert(variant).second) {
    Fail<Error>("cannot write '{}': prompt {} has variant '{}' twice", path.string(), prompt,
                variant);
  }
}

// A report that contradicts itself is a bug in the verifier (hence Error, exit code 1), found
// before any file exists.
void CheckConsistent(const VerificationReport& report, const std::filesystem::path& path) {
  for (std::size_t i = 0; i < report.prompts.size(); ++i) {
    const PromptResult& prompt = report.prompts[i];
    std::set<std::string> logits_variants;
    for (const auto& logits : prompt.logits) {
      CheckVariantName(path, i, logits.variant, logits_variants);
      const uint64_t numel = CheckedNumel(logits.shape, "logits shape");
      if (logits.shape.size() > H5S_MAX_RANK || numel != logits.values.size()) {
        Fail<Error>(
            "cannot write '{}': the logits of prompt {}, variant '{}', have shape [{}] but "
            "{} values",
            path.string(), i, logits.variant, fmt::join(logits.shape, ", "), logits.values.size());
      }
    }
    std::set<std::string> top_k_variants;
    for (const auto& top_k : prompt.top_k) CheckVariantName(path, i, top_k.variant, top_k_variants);
  }
}

h5::File CreateFile(const std::filesystem::path& temp, const Target& target) {
  const std::string object = fmt::format("file '{}'", temp.string());
  h5::PropertyList access(Check(H5Pcreate(H5P_FILE_ACCESS), target, "configure", object));
#if H5_VERSION_GE(1, 12, 1) || (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7)
  // The temporary name is this process's alone, so HDF5's flock() protects nothing, while on
  // mounts without flock (Lustre, some NFS) it makes the create fail with errno 38.
  Check(H5Pset_file_locking(access.get(), false, true), target, "configure", object);
#endif
  return h5::File(Check(H5Fcreate(temp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, access.get()), target,
                        "create", object));
}

}  // namespace

void WriteHdf5(const VerificationReport& report, const std::filesystem::path& path) {
  CheckConsistent(report, path);
  // HDF5 writes by name, so the file is a named PendingPath: the final name never shows a partial
  // file (a reader polling for verification.h5, a job killed at its time limit), and a failure
  // removes it. An existing report is replaced, as a rerun's should be.
  PendingPath temp = PendingPath::File(path.has_parent_path() ? path.parent_path() : ".",
                                       "." + path.filename().string() + ".tmp-", path);
  {
    // Error printing is off for this thread only in a thread-safe HDF5 (Debian's is one); in
    // other builds it is process-wide, and no other thread may use HDF5 meanwhile.
    const h5::SilenceErrorPrinting quiet;
    Target target{H5I_INVALID_HID, path.string()};
    h5::File file = CreateFile(temp.path(), target);
    target.file = file.get();
    WriteContents(target, report);
    Check(file.Close(), target, "close", fmt::format("file '{}'", temp.path().string()));
  }
  std::move(temp).Publish(path, /*overwrite=*/true);
}

}  // namespace adapter_job::verify
