// libFuzzer target: the input is a qcow2 host file (see image_fuzz_body.h).
//   fuzz_image -max_total_time=120 -rss_limit_mb=2048 -timeout=10 CORPUS_DIR
// Seeds: tests/fuzz/make_seeds.sh DIR (images made by qemu-img with every option).
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "fuzz/image_fuzz_body.h"
#include "util/log.h"

// Corrupt images make the engine log an error each; QCOWFS_FUZZ_VERBOSE=1 shows them.
extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  qcowfs::SetLogLevel(getenv("QCOWFS_FUZZ_VERBOSE") ? qcowfs::LogLevel::kDebug : qcowfs::LogLevel::kError);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcowfs::fuzz::RunImageInput(data, size);
  return 0;
}
