// Helpers for tests on image files: whole-file I/O, big-endian fields in place, opening
// an image with the engine, and qemu-img/qemu-io as the oracle.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "qcow2/image.h"
#include "support/must.h"
#include "support/process.h"

namespace qcowfs::testing {

inline std::vector<uint8_t> ReadFileBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

inline uint64_t FileBE64(const std::string& path, uint64_t off) {
  int fd = open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  uint8_t b[8];
  REQUIRE(pread(fd, b, 8, static_cast<off_t>(off)) == 8);
  close(fd);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[i];
  return v;
}

inline void SetFileBE64(const std::string& path, uint64_t off, uint64_t v) {
  int fd = open(path.c_str(), O_WRONLY);
  REQUIRE(fd >= 0);
  uint8_t b[8];
  for (int i = 7; i >= 0; --i, v >>= 8) b[i] = static_cast<uint8_t>(v);
  REQUIRE(pwrite(fd, b, 8, static_cast<off_t>(off)) == 8);
  close(fd);
}

inline std::unique_ptr<qcow2::Qcow2Image> OpenImageOk(const std::string& path, bool read_only = false) {
  qcow2::OpenOptions o;
  o.read_only = read_only;
  auto r = qcow2::Qcow2Image::Open(path, o);
  REQUIRE_MESSAGE(r.ok(), "open " << path << ": " << r.status().message());
  return std::move(r).value();
}

// The bytes [off, off+len) of an image as the engine reads them.
inline std::vector<uint8_t> EngineRead(qcow2::Qcow2Image* img, uint64_t off, uint64_t len) {
  std::vector<uint8_t> buf(len);
  Status s = img->Read(off, buf.data(), len);
  REQUIRE_MESSAGE(s.ok(), "read " << off << "+" << len << ": " << s.message());
  return buf;
}

inline bool AllBytes(const std::vector<uint8_t>& v, uint8_t b) {
  return std::all_of(v.begin(), v.end(), [b](uint8_t x) { return x == b; });
}

inline void QemuIoOk(const std::string& fmt, const std::string& img, const std::vector<std::string>& cmds) {
  std::vector<std::string> argv = {"qemu-io", "-f", fmt};
  for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
  argv.push_back(img);
  Must(argv);
}

// qemu-img check: exit 0 (clean) or, with leaks_ok, 3 (leaked clusters only).
inline void QemuCheck(const std::string& img, bool leaks_ok = false) {
  CmdResult r = RunCommand({"qemu-img", "check", img});
  INFO("qemu-img check " << img << ": exit " << r.exit_code << "\n" << r.out << r.err);
  CHECK((r.exit_code == 0 || (leaks_ok && r.exit_code == 3)));
}

}  // namespace qcowfs::testing
