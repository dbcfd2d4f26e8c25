// mmap of the mounted file through a real mount (SPEC §3, mmap row): MAP_SHARED and
// MAP_PRIVATE, read and write; msync(MS_SYNC) + fsync durability; direct reads after msync
// and direct writes under a mapping; the read-only mount. qemu-img compare/check and a raw
// shadow are the oracle. Coherence with fallocate, truncate, concurrent I/O and a mirror
// pivot: mmap_coherence_test.cc.
//
// The file is a FOPEN_DIRECT_IO file: MAP_SHARED needs FUSE_DIRECT_IO_ALLOW_MMAP, which
// the daemon negotiates on kernels 6.6 and later (these tests need such a kernel).
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "mmap_util.h"
#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

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
    } ws[] = {
        {100, 3000},       {64 * KiB - 10, 20}, {3 * MiB + 4095, 200 * KiB}, {4 * MiB - 1000, 9000},
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
        CheckPread(f.get(), want, off & ~(kPage - 1),
                   4 * kPage <= 8 * MiB - (off & ~(kPage - 1)) ? 4 * kPage : len, "after msync");
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
        INFO("direct write #" << i << std::string(odirect ? " O_DIRECT" : "") << " [" << off
                              << ", +" << len << ")");
        CheckMapped(m, want, off & ~(kPage - 1),
                    std::min<uint64_t>(8 * MiB - (off & ~(kPage - 1)), len + 2 * kPage),
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
