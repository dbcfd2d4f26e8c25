// qemu-img check as the oracle of crash tests (crash_enum_test, sync_kill_test).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace qcowfs::testing {

struct ImageCheck {
  int exit_code = -1;
  std::string output;  // stdout + stderr
};

// `qemu-img check -f qcow2 img`.
ImageCheck QemuImgCheck(const std::string& img);

// Whether an image after a crash passes: exit 0, or 3 (leaked clusters only) when leaks
// are allowed. With the dirty bit set (lazy refcounts: the next writable open rebuilds the
// refcounts) exit 2 passes too when every error is a refcount error.
bool CrashCheckPasses(const ImageCheck& r, bool allow_leaks, bool dirty);

// "qemu-img check <when> exit N:" and the first lines of its output.
std::string DescribeCheck(const ImageCheck& r, const std::string& when);

// Whether every ERROR line of qemu-img check output is a refcount mismatch.
bool OnlyRefcountErrors(const std::string& output);

// The first `lines` lines of s, and how many more there were.
std::string HeadLines(const std::string& s, int lines);

// The qcow2 v3 dirty bit, from the first bytes of an image / from an image file.
bool DirtyBit(const uint8_t* header, size_t len);
bool DirtyBitOf(const std::string& path);

}  // namespace qcowfs::testing
