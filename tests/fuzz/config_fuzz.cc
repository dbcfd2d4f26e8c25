// libFuzzer target: the input is config / control-protocol text (see config_fuzz_body.h).
//   fuzz_config -max_total_time=120 -rss_limit_mb=2048 -timeout=10 CORPUS_DIR
// Seeds: tests/fuzz/seeds/config/.
#include <cstddef>
#include <cstdint>

#include "fuzz/config_fuzz_body.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcowfs::fuzz::RunConfigInput(data, size);
  return 0;
}
