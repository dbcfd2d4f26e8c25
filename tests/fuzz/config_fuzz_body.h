// The per-input body of the config fuzzer, shared by tests/fuzz/config_fuzz.cc
// (libFuzzer) and tests/unit/config/fuzz_regression_test.cc, which replays every file in
// tests/fuzz/regressions/config/ in every build.
//
// Contract: returns normally for every input. A crash, a sanitizer report, an escaping
// exception or an abort() on a broken invariant is a finding.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qcowfs::fuzz {

// Feeds data to the config and control-protocol parsers (mount config, -o option
// list, control request, reply, status JSON) and to ParseSize, and round-trips what
// parses. Aborts when a round trip disagrees.
void RunConfigInput(const uint8_t* data, size_t size);

}  // namespace qcowfs::fuzz
