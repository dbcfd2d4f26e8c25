// mmap of the mounted file through a real mount (SPEC §3, mmap row): MAP_SHARED and
// MAP_PRIVATE, read and write; msync(MS_SYNC) + fsync durability; and coherence of mapped
// pages with direct reads and writes, punch-hole, zero-range, truncate-grow and a mirror
// pivot. qemu-img compare/check and a raw shadow are the oracle.
//
// The file is a FOPEN_DIRECT_IO file: MAP_SHARED needs FUSE_DIRECT_IO_ALLOW_MMAP, which
// the daemon negotiates on kernels 6.6 and later (these tests need such a kernel).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "integration/mirror/mirror_rig.h"
#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

constexpr uint64_t kPage = 4096;

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
#define REQUIRE_MAPPED(m)                                                          \
  do {                                                                             \
    INFO("mmap: " << std::string(strerror((m).err())) << " (MAP_SHARED on a direct-io FUSE file " \
                  "needs FUSE_DIRECT_IO_ALLOW_MMAP, kernel 6.6+)");                \
    REQUIRE((m).ok());                                                             \
  } while (0)

// Kernel 6.6 or later (FUSE_DIRECT_IO_ALLOW_MMAP); skips (fails under CI) otherwise.
void RequireMmapKernel() {
  utsname u {};
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

Pair MakeRandomPair(const Scratch& s, uint64_t size, uint64_t data, uint64_t seed) {
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

void WriteRef(const std::string& ref, uint64_t off, const void* buf, size_t len) {
  Fd r(ref, O_RDWR);
  REQUIRE(PwriteAll(r.get(), buf, len, off));
}

std::vector<char> ReadAll(const std::string& path, uint64_t len) { return ReadRange(path, 0, len); }

// The mapping's [off, off+len) equals want[off, off+len).
void CheckMapped(const Mapping& m, const std::vector<char>& want, uint64_t off, uint64_t len, const char* what) {
  long long d = FirstDiff(m.data() + off, want.data() + off, len);
  INFO(std::string(what) << ": mapping [" << off << ", +" << len << ") first difference at +" << d);
  CHECK(d == -1);
}

// The file read with pread over [off, off+len) equals want's bytes there.
void CheckPread(int fd, const std::vector<char>& want, uint64_t off, uint64_t len, const char* what) {
  std::vector<char> got(len);
  REQUIRE(PreadAll(fd, got.data(), len, off));
  long long d = FirstDiff(got.data(), want.data() + off, len);
  INFO(std::string(what) << ": pread [" << off << ", +" << len << ") first difference at +" << d);
  CHECK(d == -1);
}

// Touches every page of the mapping (faults them into the page cache).
uint64_t TouchAll(const Mapping& m) {
  uint64_t sum = 0;
  for (size_t i = 0; i < m.size(); i += kPage) sum += static_cast<unsigned char>(m.data()[i]);
  return sum;
}

// qemu-img compare -U against the shadow while the image is still mounted (what fsync put on
// disk, read beside the daemon).
void CheckOnDiskWhileMounted(const std::string& img, const std::string& ref) {
  std::vector<std::string> argv = {"qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", img, ref};
  CmdResult r = RunTimed(argv);
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 0);
}

}  // namespace

TEST_CASE("mount mmap: MAP_SHARED and MAP_PRIVATE read what qemu-io wrote before the mount") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 16 * MiB, 6 * MiB, 1);
  // Zero clusters, a pattern and a hole as well, written by qemu-io.
  QemuIo(p.img, {"write -P 0x5a 8M 192k", "write -z 1M 256k", "write -P 0x33 12345 777"});
  {
    std::vector<char> pat(192 * KiB, 0x5a), z(256 * KiB, 0), q(777, 0x33);
    WriteRef(p.ref, 8 * MiB, pat.data(), pat.size());
    WriteRef(p.ref, MiB, z.data(), z.size());
    WriteRef(p.ref, 12345, q.data(), q.size());
  }
  std::vector<char> want = ReadAll(p.ref, 16 * MiB);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping shared(f.get(), 16 * MiB, PROT_READ, MAP_SHARED);
    REQUIRE_MAPPED(shared);
    CheckMapped(shared, want, 0, 16 * MiB, "MAP_SHARED");
    Mapping priv(f.get(), 16 * MiB, PROT_READ, MAP_PRIVATE);
    REQUIRE_MAPPED(priv);
    CheckMapped(priv, want, 0, 16 * MiB, "MAP_PRIVATE");
    // A mapping at an offset.
    Mapping part(f.get(), 256 * KiB, PROT_READ, MAP_SHARED, static_cast<off_t>(8 * MiB - 64 * KiB));
    REQUIRE_MAPPED(part);
    CHECK(FirstDiff(part.data(), want.data() + 8 * MiB - 64 * KiB, 256 * KiB) == -1);
  }
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: MAP_SHARED writes + msync(MS_SYNC) + fsync are durable in the image") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 16 * MiB, 4 * MiB, 2);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), 16 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    std::mt19937_64 rng(TestSeed(22));
    // Unaligned writes over allocated data, across cluster boundaries and into unallocated
    // clusters (allocating writes from page writeback).
    struct W {
      uint64_t off, len;
    } ws[] = {{100, 3000}, {64 * KiB - 10, 20}, {3 * MiB + 4095, 200 * KiB}, {4 * MiB - 1000, 9000},
              {9 * MiB + 77, 1}, {15 * MiB, MiB}};
    for (const W& w : ws) {
      std::vector<char> b = RandomBytes(rng, w.len);
      std::memcpy(m.data() + w.off, b.data(), w.len);
      WriteRef(p.ref, w.off, b.data(), w.len);
    }
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    // On disk now, while still mounted and mapped.
    CheckOnDiskWhileMounted(p.img, p.ref);
  }
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: direct reads see mapped writes after msync, and a direct write is seen by the mapping") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 8 * MiB, 8 * MiB, 3);
  std::vector<char> want = ReadAll(p.ref, 8 * MiB);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    Fd od(mp, O_RDWR | O_DIRECT);
    REQUIRE(f.valid());
    REQUIRE(od.valid());
    Mapping m(f.get(), 8 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    TouchAll(m);
    std::mt19937_64 rng(TestSeed(33));

    SUBCASE("mapped write, msync, direct read") {
      for (int i = 0; i < 64; i++) {
        uint64_t len = 1 + rng() % (3 * kPage), off = rng() % (8 * MiB - len);
        std::vector<char> b = RandomBytes(rng, len);
        std::memcpy(m.data() + off, b.data(), len);
        std::memcpy(want.data() + off, b.data(), len);
        REQUIRE(m.Sync(off, len) == 0);
        CheckPread(f.get(), want, off & ~(kPage - 1), 4 * kPage <= 8 * MiB - (off & ~(kPage - 1)) ? 4 * kPage : len,
                   "after msync");
      }
      CheckPread(f.get(), want, 0, 8 * MiB, "whole file");
    }

    SUBCASE("direct write (plain and O_DIRECT) over mapped pages") {
      for (int i = 0; i < 64; i++) {
        bool odirect = i % 2 == 1;
        uint64_t len = odirect ? kPage * (1 + rng() % 4) : 1 + rng() % (3 * kPage);
        uint64_t off = odirect ? (rng() % (8 * MiB / kPage - 4)) * kPage : rng() % (8 * MiB - len);
        // Dirty a byte of the same page through the mapping first: the kernel writes it
        // back before the direct write and drops the page after, so both land.
        uint64_t dirty = off & ~(kPage - 1);
        if (dirty + 1 <= off || dirty >= off + len) {
          m.data()[dirty] = static_cast<char>(rng());
          want[dirty] = m.data()[dirty];
        }
        TouchAll(m);
        void* buf = nullptr;
        REQUIRE(posix_memalign(&buf, kPage, len) == 0);
        std::vector<char> b = RandomBytes(rng, len);
        std::memcpy(buf, b.data(), len);
        bool ok = PwriteAll(odirect ? od.get() : f.get(), buf, len, off);
        free(buf);
        REQUIRE(ok);
        std::memcpy(want.data() + off, b.data(), len);
        INFO("direct write #" << i << std::string(odirect ? " O_DIRECT" : "") << " [" << off << ", +" << len << ")");
        CheckMapped(m, want, off & ~(kPage - 1), std::min<uint64_t>(8 * MiB - (off & ~(kPage - 1)), len + 2 * kPage),
                    "after the direct write");
      }
      REQUIRE(m.SyncAll() == 0);
      CheckMapped(m, want, 0, 8 * MiB, "whole mapping");
      CheckPread(f.get(), want, 0, 8 * MiB, "whole file");
    }
    REQUIRE(::fsync(f.get()) == 0);
  }
  CHECK_UNMOUNTS(g);
  WriteRef(p.ref, 0, want.data(), want.size());
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: PUNCH_HOLE and ZERO_RANGE over mapped (and dirty) pages read zeros through the mapping") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 16 * MiB, 16 * MiB, 4);
  std::vector<char> want = ReadAll(p.ref, 16 * MiB);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  struct Op {
    int mode;
    uint64_t off, len;
    const char* name;
  } ops[] = {
      {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB, "punch whole clusters"},
      {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * MiB + 100, 5000, "punch inside a cluster, partial pages"},
      {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB - 3000, 200 * KiB, "punch across clusters"},
      {FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 6 * MiB, MiB, "zero whole clusters"},
      {FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 8 * MiB + 4000, 300, "zero inside a page"},
      {FALLOC_FL_ZERO_RANGE, 10 * MiB - 5000, 70 * KiB, "zero across clusters, no KEEP_SIZE"},
      {FALLOC_FL_ZERO_RANGE, 16 * MiB - 8192, 8192, "zero the last pages, no KEEP_SIZE"},
  };
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), 16 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    std::mt19937_64 rng(TestSeed(44));
    for (const Op& op : ops) {
      INFO(std::string(op.name) << " [" << op.off << ", +" << op.len << ")");
      CheckMapped(m, want, 0, 16 * MiB, "before");  // every page cached
      // Dirty pages in and next to the range, not synced: written back before the punch.
      for (uint64_t at : {op.off > kPage ? op.off - kPage : 0, op.off, op.off + op.len / 2, op.off + op.len - 1}) {
        char c = static_cast<char>(rng() | 1);
        m.data()[at] = c;
        want[at] = c;
      }
      REQUIRE(::fallocate(f.get(), op.mode, static_cast<off_t>(op.off), static_cast<off_t>(op.len)) == 0);
      std::memset(want.data() + op.off, 0, op.len);
      CheckMapped(m, want, 0, 16 * MiB, "after");
      CheckPread(f.get(), want, op.off & ~(kPage - 1), std::min<uint64_t>(16 * MiB - (op.off & ~(kPage - 1)), op.len + 2 * kPage), "pread after");
    }
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CHECK(FileSize(mp) == 16 * MiB);
  }
  CHECK_UNMOUNTS(g);
  WriteRef(p.ref, 0, want.data(), want.size());
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: truncate grow; the mapping past the old EOF reads zeros and takes writes") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  const uint64_t old_size = 8 * MiB - 512, new_size = 12 * MiB;  // old EOF inside a page
  Pair p = MakeRandomPair(s, old_size, old_size, 5);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  std::vector<char> want(new_size, 0);
  {
    std::vector<char> old = ReadAll(p.ref, old_size);
    std::memcpy(want.data(), old.data(), old_size);
  }
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), new_size, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    CheckMapped(m, want, 0, old_size, "before the grow");
    // The tail of the last page (past EOF) reads zeros; scribble on it: never written back.
    CHECK(AllBytes(std::vector<char>(m.data() + old_size, m.data() + 8 * MiB), 0));
    std::memset(m.data() + old_size, 0x6b, 512);
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::ftruncate(f.get(), static_cast<off_t>(new_size)) == 0);
    CHECK(FileSize(mp) == new_size);
    CheckMapped(m, want, old_size - 4 * kPage, new_size - (old_size - 4 * kPage), "after the grow");
    std::mt19937_64 rng(TestSeed(55));
    std::vector<char> b = RandomBytes(rng, 3 * MiB);
    std::memcpy(m.data() + old_size - 100, b.data(), b.size());
    std::memcpy(want.data() + old_size - 100, b.data(), b.size());
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CheckPread(f.get(), want, 0, new_size, "pread after mapped writes past the old EOF");
  }
  CHECK_UNMOUNTS(g);
  CHECK(VirtualSize(p.img) == new_size);
  REQUIRE(::truncate(p.ref.c_str(), static_cast<off_t>(new_size)) == 0);
  WriteRef(p.ref, 0, want.data(), want.size());
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: MAP_PRIVATE writes never reach the image") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 4 * MiB, 2 * MiB, 6);
  std::vector<char> want = ReadAll(p.ref, 4 * MiB);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping shared(f.get(), 4 * MiB, PROT_READ, MAP_SHARED);
    REQUIRE_MAPPED(shared);
    TouchAll(shared);
    Mapping priv(f.get(), 4 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    REQUIRE_MAPPED(priv);
    std::memset(priv.data() + 1000, 0x7e, 3 * MiB);
    CHECK(AllBytes(std::vector<char>(priv.data() + 1000, priv.data() + 1000 + 3 * MiB), 0x7e));
    REQUIRE(priv.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CheckMapped(shared, want, 0, 4 * MiB, "MAP_SHARED beside the private copy");
    CheckPread(f.get(), want, 0, 4 * MiB, "pread beside the private copy");
    priv.Unmap();
    CheckPread(f.get(), want, 0, 4 * MiB, "pread after munmap");
  }
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: direct writes and mapped reads/writes from two threads on disjoint ranges") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  const uint64_t size = 32 * MiB, chunk = 64 * KiB, nchunks = size / chunk;
  Pair p = MakeRandomPair(s, size, 16 * MiB, 7);
  std::vector<char> want = ReadAll(p.ref, size);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), size, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    std::atomic<bool> failed{false};
    std::string direct_err, mapped_err;
    const uint64_t seed = TestSeed(77);
    // Even chunks: direct pwrite/pread. Odd chunks: mapped writes and reads, msync now and then.
    std::thread direct([&] {
      std::mt19937_64 rng(seed);
      for (int i = 0; i < 400 && !failed; i++) {
        uint64_t c = 2 * (rng() % (nchunks / 2));
        uint64_t len = 1 + rng() % chunk, off = c * chunk + rng() % (chunk - len + 1);
        std::vector<char> b = RandomBytes(rng, len);
        if (!PwriteAll(f.get(), b.data(), len, off)) {
          direct_err = std::string("pwrite: ") + strerror(errno);
          failed = true;
          break;
        }
        std::memcpy(want.data() + off, b.data(), len);
        std::vector<char> got(len);
        if (!PreadAll(f.get(), got.data(), len, off) || FirstDiff(got.data(), b.data(), len) != -1) {
          direct_err = "pread after pwrite differs at " + std::to_string(off);
          failed = true;
        }
      }
    });
    std::thread mapped([&] {
      std::mt19937_64 rng(seed + 1);
      for (int i = 0; i < 400 && !failed; i++) {
        uint64_t c = 2 * (rng() % (nchunks / 2)) + 1;
        uint64_t len = 1 + rng() % chunk, off = c * chunk + rng() % (chunk - len + 1);
        if (rng() % 3 == 0) {
          long long d = FirstDiff(m.data() + c * chunk, want.data() + c * chunk, chunk);
          if (d != -1) {
            mapped_err = "mapped read of chunk " + std::to_string(c) + " differs at +" + std::to_string(d);
            failed = true;
          }
          continue;
        }
        std::vector<char> b = RandomBytes(rng, len);
        std::memcpy(m.data() + off, b.data(), len);
        std::memcpy(want.data() + off, b.data(), len);
        if (rng() % 8 == 0 && m.Sync(off, len) != 0) {
          mapped_err = std::string("msync: ") + strerror(errno);
          failed = true;
        }
      }
    });
    direct.join();
    mapped.join();
    INFO(direct_err << " " << mapped_err);
    REQUIRE_FALSE(failed);
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CheckMapped(m, want, 0, size, "mapping at the end");
    CheckPread(f.get(), want, 0, size, "pread at the end");
  }
  CHECK_UNMOUNTS(g);
  WriteRef(p.ref, 0, want.data(), want.size());
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: random mapped and direct ops, punches and zeroing match a model") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  const uint64_t size = 8 * MiB;
  Pair p = MakeRandomPair(s, size, 6 * MiB, 8);
  std::vector<char> want = ReadAll(p.ref, size);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  const uint64_t seed = TestSeed(88);
  std::ostringstream log;
  log << "seed " << seed << " (QCOWFS_TEST_SEED)\n";
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), size, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    std::mt19937_64 rng(seed);
    auto range = [&](uint64_t max_len) {
      uint64_t len = 1 + rng() % max_len;
      if (rng() % 4 == 0) len = (len + kPage - 1) & ~(kPage - 1);
      if (len > size) len = size;
      uint64_t off = rng() % (size - len + 1);
      if (rng() % 4 == 0) off &= ~(kPage - 1);
      return std::make_pair(off, len);
    };
    bool bad = false;
    for (int i = 0; i < 1500 && !bad; i++) {
      auto [off, len] = range(i % 50 == 0 ? 2 * MiB : 128 * KiB);
      int op = static_cast<int>(rng() % 7);
      static const char* names[] = {"mwrite", "mread", "pwrite", "pread", "punch", "zero", "msync"};
      log << i << " " << names[op] << " " << off << "+" << len << "\n";
      switch (op) {
        case 0: {
          std::vector<char> b = RandomBytes(rng, len);
          std::memcpy(m.data() + off, b.data(), len);
          std::memcpy(want.data() + off, b.data(), len);
          break;
        }
        case 1: {
          long long d = FirstDiff(m.data() + off, want.data() + off, len);
          if (d != -1) {
            log << "  mapping differs at " << off + d << "\n";
            bad = true;
          }
          break;
        }
        case 2: {
          std::vector<char> b = RandomBytes(rng, len);
          REQUIRE(PwriteAll(f.get(), b.data(), len, off));
          std::memcpy(want.data() + off, b.data(), len);
          break;
        }
        case 3: {
          REQUIRE(m.Sync(off, len) == 0);  // the contract: direct reads see mapped writes after msync
          std::vector<char> got(len);
          REQUIRE(PreadAll(f.get(), got.data(), len, off));
          long long d = FirstDiff(got.data(), want.data() + off, len);
          if (d != -1) {
            log << "  pread differs at " << off + d << "\n";
            bad = true;
          }
          break;
        }
        case 4:
        case 5: {
          int mode = (op == 4 ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
          REQUIRE(::fallocate(f.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len)) == 0);
          std::memset(want.data() + off, 0, len);
          break;
        }
        case 6:
          REQUIRE(m.Sync(off, len) == 0);
          break;
      }
    }
    if (!bad && FirstDiff(m.data(), want.data(), size) != -1) {
      log << "final: mapping differs at " << FirstDiff(m.data(), want.data(), size) << "\n";
      bad = true;
    }
    INFO(log.str());
    REQUIRE_FALSE(bad);
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CheckPread(f.get(), want, 0, size, "pread at the end");
  }
  CHECK_UNMOUNTS(g);
  WriteRef(p.ref, 0, want.data(), want.size());
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount mmap: a read-only mount maps for reading; writable MAP_SHARED is refused") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  Pair p = MakeRandomPair(s, 4 * MiB, 4 * MiB, 9);
  std::vector<char> want = ReadAll(p.ref, 4 * MiB);
  std::string before = Sha256File(p.img);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", "--read-only", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd rw(mp, O_RDWR);
    CHECK_FALSE(rw.valid());
    CHECK(errno == EROFS);
    Fd f(mp, O_RDONLY);
    REQUIRE(f.valid());
    Mapping r(f.get(), 4 * MiB, PROT_READ, MAP_SHARED);
    REQUIRE_MAPPED(r);
    CheckMapped(r, want, 0, 4 * MiB, "read-only MAP_SHARED");
    Mapping w(f.get(), 4 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED);
    CHECK_FALSE(w.ok());
    CHECK(w.err() == EACCES);
    // mprotect cannot make a read-only shared mapping writable either.
    CHECK(::mprotect(r.data(), kPage, PROT_READ | PROT_WRITE) != 0);
    // A private copy may be written; it stays private.
    Mapping priv(f.get(), 4 * MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE);
    REQUIRE_MAPPED(priv);
    std::memset(priv.data(), 0x11, 8192);
    CheckMapped(r, want, 0, 4 * MiB, "read-only MAP_SHARED beside a written private copy");
  }
  CHECK_UNMOUNTS(g);
  CHECK(Sha256File(p.img) == before);
}

TEST_CASE("mount mmap: a mapping stays coherent across a mirror pivot; later mapped writes land in the target") {
  RequireMountTools();
  RequireMmapKernel();
  MirrorRig r;
  const uint64_t size = 16 * MiB;
  std::mt19937_64 rng(TestSeed(99));
  std::string ref = r.s.File("ref.raw");
  MakeRaw(ref, size);
  std::vector<char> want(size, 0);
  {
    std::vector<char> b = RandomBytes(rng, 8 * MiB);
    std::memcpy(want.data(), b.data(), b.size());
    WriteRef(ref, 0, want.data(), want.size());
    QemuImgCreate(r.img, std::to_string(size));
    Must({"qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", ref, r.img});
  }
  std::string dst = r.s.File("dst.qcow2");
  auto g = r.Mount();
  {
    Fd f(r.mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), size, PROT_READ | PROT_WRITE, MAP_SHARED);
    REQUIRE_MAPPED(m);
    CheckMapped(m, want, 0, size, "before the job");
    auto scribble = [&](int n) {
      for (int i = 0; i < n; i++) {
        uint64_t len = 1 + rng() % (64 * KiB), off = rng() % (size - len);
        std::vector<char> b = RandomBytes(rng, len);
        std::memcpy(m.data() + off, b.data(), len);
        std::memcpy(want.data() + off, b.data(), len);
      }
    };
    scribble(50);
    r.MustMirror({"start", r.Job(R"({"id": "p", "target": {"path": ")" + dst + R"("}})"), "--wait"});
    scribble(50);  // dirty pages, written back after the pivot or before it
    r.MustMirror({"complete", "p"});
    CheckMapped(m, want, 0, size, "right after the pivot");
    scribble(50);
    REQUIRE(m.SyncAll() == 0);
    REQUIRE(::fsync(f.get()) == 0);
    CheckPread(f.get(), want, 0, size, "pread after the pivot");
    CheckMapped(m, want, 0, size, "mapping after the pivot");
  }
  CHECK_UNMOUNTS(*g);
  WriteRef(ref, 0, want.data(), want.size());
  CheckClean(dst);
  CheckSameContent(dst, ref);
}

// The kernel drops the cached pages of a direct write's range before it sends the write;
// a fault on those pages while the write is in flight must not leave the old data cached
// once the write returned. The faulter thread keeps faulting the pages in (the one being
// written most); after each pwrite returns, the mapping must show it.
TEST_CASE("mount mmap: a direct write is seen by the mapping even while another thread faults the pages in") {
  RequireMountTools();
  RequireMmapKernel();
  Scratch s;
  const uint64_t npages = 8, size = 4 * MiB;
  Pair p = MakeRandomPair(s, size, size, 10);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    Mapping m(f.get(), size, PROT_READ, MAP_SHARED);
    REQUIRE_MAPPED(m);
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> target{0};  // the page being written: the faulter hammers it
    std::thread faulter([&] {
      volatile uint64_t sink = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        uint64_t t = target.load(std::memory_order_relaxed);
        for (int k = 0; k < 64; k++) sink = sink + static_cast<unsigned char>(m.data()[t * kPage + 100]);
        for (uint64_t i = 0; i < npages; i++) sink = sink + static_cast<unsigned char>(m.data()[i * kPage + 100]);
      }
    });
    std::string stale;
    std::vector<char> b(kPage);
    for (int i = 1; i <= 5000 && stale.empty(); i++) {
      uint64_t pg = static_cast<uint64_t>(i) % npages;
      target.store(pg, std::memory_order_relaxed);
      std::memset(b.data(), 0, kPage);
      std::memcpy(b.data() + 100, &i, sizeof(i));
      if (!PwriteAll(f.get(), b.data(), kPage, pg * kPage)) {
        stale = std::string("pwrite: ") + strerror(errno);
        break;
      }
      int got = 0;
      std::memcpy(&got, m.data() + pg * kPage + 100, sizeof(got));
      if (got != i)
        stale = "write #" + std::to_string(i) + " to page " + std::to_string(pg) + ": the mapping shows #" +
                std::to_string(got);
    }
    stop = true;
    faulter.join();
    INFO(stale);
    CHECK(stale.empty());
  }
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
}
