// Replays saved fuzz inputs through a fuzz target's LLVMFuzzerTestOneInput without libFuzzer, so
// every finding stays a regression test of the ordinary (and the sanitizer) build. Arguments are
// files or directories (each file in it, README excluded); a crash or a sanitizer report fails
// the run, as it did under the fuzzer.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

void Replay(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    std::fprintf(stderr, "cannot read %s\n", file.c_str());
    std::exit(2);  // a missing input must not pass as replayed
  }
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), {});
  std::printf("replay %s (%zu bytes)\n", file.c_str(), bytes.size());
  std::fflush(stdout);
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

}  // namespace

int main(int argc, char** argv) {
  std::size_t count = 0;
  for (int i = 1; i < argc; ++i) {
    const std::filesystem::path path(argv[i]);
    if (!std::filesystem::is_directory(path)) {
      Replay(path);
      ++count;
      continue;
    }
    for (const auto& entry : std::filesystem::directory_iterator(path)) {
      if (!entry.is_regular_file() || entry.path().filename() == "README") continue;
      Replay(entry.path());
      ++count;
    }
  }
  std::printf("%zu inputs replayed\n", count);
  return 0;
}
