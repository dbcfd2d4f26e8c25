// Helpers of the mmap tests (mmap_test.cc, mmap_coherence_test.cc): a mapping that unmaps
// itself, the kernel check, a qcow2 image with a raw shadow, and the comparisons.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "mount_guard.h"

namespace qcowfs::testing::mount {

inline constexpr uint64_t kPage = 4096;

// A mapping, unmapped on destruction (before the mount goes: a mapping keeps the file open).
class Mapping {
 public:
  Mapping(int fd, size_t len, int prot, int flags, off_t off = 0) : len_(len) {
    p_ = ::mmap(nullptr, len, prot, flags, fd, off);
    err_ = p_ == MAP_FAILED ? errno : 0;
  }
  ~Mapping() { Unmap(); }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  bool ok() const { return p_ != MAP_FAILED; }
  int err() const { return err_; }
  char* data() const { return static_cast<char*>(p_); }
  size_t size() const { return len_; }
  // msync(MS_SYNC) of [off, off+len) (page-aligned outward).
  int Sync(uint64_t off, uint64_t len) const {
    uint64_t a = off & ~(kPage - 1), b = (off + len + kPage - 1) & ~(kPage - 1);
    return ::msync(data() + a, b - a, MS_SYNC);
  }
  int SyncAll() const { return ::msync(p_, len_, MS_SYNC); }
  void Unmap() {
    if (p_ != MAP_FAILED) ::munmap(p_, len_);
    p_ = MAP_FAILED;
  }

 private:
  void* p_ = MAP_FAILED;
  size_t len_;
  int err_ = 0;
};

// A mapping that must succeed.
#define REQUIRE_MAPPED(m)                                              \
  do {                                                                 \
    INFO("mmap: " << std::string(strerror((m).err()))                  \
                  << " (MAP_SHARED on a direct-io FUSE file "          \
                     "needs FUSE_DIRECT_IO_ALLOW_MMAP, kernel 6.6+)"); \
    REQUIRE((m).ok());                                                 \
  } while (0)

// Kernel 6.6 or later (FUSE_DIRECT_IO_ALLOW_MMAP); skips (fails under CI) otherwise.
inline void RequireMmapKernel() {
  utsname u{};
  uname(&u);
  int major = 0, minor = 0;
  sscanf(u.release, "%d.%d", &major, &minor);
  if (major < 6 || (major == 6 && minor < 6))
    SkipOrFail(std::string("kernel ") + u.release + " has no FUSE_DIRECT_IO_ALLOW_MMAP (6.6+)");
}

// A qcow2 image whose content is a raw shadow's: random data over [0, data), zeros after.
struct Pair {
  std::string img, ref;
};

inline Pair MakeRandomPair(const Scratch& s, uint64_t size, uint64_t data, uint64_t seed) {
  Pair p{s.File("disk.qcow2"), s.File("ref.raw")};
  QemuImgCreate(p.img, std::to_string(size));
  MakeRaw(p.ref, size);
  if (data) {
    std::mt19937_64 rng(seed);
    std::vector<char> v = RandomBytes(rng, data);
    Fd r(p.ref, O_RDWR);
    REQUIRE(PwriteAll(r.get(), v.data(), v.size(), 0));
    r.Close();
    Must({"qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", p.ref, p.img});
  }
  return p;
}

inline void WriteRef(const std::string& ref, uint64_t off, const void* buf, size_t len) {
  Fd r(ref, O_RDWR);
  REQUIRE(PwriteAll(r.get(), buf, len, off));
}

inline std::vector<char> ReadAll(const std::string& path, uint64_t len) {
  return ReadRange(path, 0, len);
}

// The mapping's [off, off+len) equals want[off, off+len).
inline void CheckMapped(const Mapping& m, const std::vector<char>& want, uint64_t off, uint64_t len,
                        const char* what) {
  long long d = FirstDiff(m.data() + off, want.data() + off, len);
  INFO(std::string(what) << ": mapping [" << off << ", +" << len << ") first difference at +" << d);
  CHECK(d == -1);
}

// The file read with pread over [off, off+len) equals want's bytes there.
inline void CheckPread(int fd, const std::vector<char>& want, uint64_t off, uint64_t len,
                       const char* what) {
  std::vector<char> got(len);
  REQUIRE(PreadAll(fd, got.data(), len, off));
  long long d = FirstDiff(got.data(), want.data() + off, len);
  INFO(std::string(what) << ": pread [" << off << ", +" << len << ") first difference at +" << d);
  CHECK(d == -1);
}

// Touches every page of the mapping (faults them into the page cache).
inline uint64_t TouchAll(const Mapping& m) {
  uint64_t sum = 0;
  for (size_t i = 0; i < m.size(); i += kPage) sum += static_cast<unsigned char>(m.data()[i]);
  return sum;
}

// qemu-img compare -U against the shadow while the image is still mounted (what fsync put on
// disk, read beside the daemon).
inline void CheckOnDiskWhileMounted(const std::string& img, const std::string& ref) {
  std::vector<std::string> argv = {"qemu-img", "compare", "-U", "-f", "qcow2",
                                   "-F",       "raw",     img,  ref};
  CmdResult r = RunTimed(argv);
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 0);
}

}  // namespace qcowfs::testing::mount
