// The per-input body of the image fuzzer, shared by tests/fuzz/image_fuzz.cc (libFuzzer)
// and tests/unit/qcow2/fuzz_regression_test.cc, which replays every file in
// tests/fuzz/regressions/image/ in every build (gcc, ASan, clang).
//
// Contract: returns normally for every input. A crash, a sanitizer report, an escaping
// exception or an abort() on a broken invariant is a finding.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qcowfs::fuzz {

// Treats data as the bytes of a qcow2 host file: opens it (read-write, else
// read-only) on an in-memory device with a small cache, runs a bounded sequence of
// reads, writes, discards, zero writes, block-status walks, a resize, flush and close,
// then reopens the result read-only and reads it again. Backing and data-file devices
// are in-memory too: a name in the header never reaches the host file system.
// Aborts when a successful write/zero/discard does not read back.
void RunImageInput(const uint8_t* data, size_t size);

}  // namespace qcowfs::fuzz
