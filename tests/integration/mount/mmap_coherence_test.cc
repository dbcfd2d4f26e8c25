// Coherence of mapped pages of the mounted file (SPEC §3, mmap row) with punch-hole,
// zero-range, truncate-grow, direct writes from another thread or racing page faults, a
// random mix of all of them against a model, and a mirror pivot. The kernel keeps the
// pages coherent (fuse/kernel_io.h); these tests hold it, and our reply ordering, to it.
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

#include "integration/mirror/mirror_rig.h"
#include "mmap_util.h"
#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

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
      {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 3 * MiB + 100, 5000,
       "punch inside a cluster, partial pages"},
      {FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4 * MiB - 3000, 200 * KiB,
       "punch across clusters"},
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
      for (uint64_t at : {op.off > kPage ? op.off - kPage : 0, op.off, op.off + op.len / 2,
                          op.off + op.len - 1}) {
        char c = static_cast<char>(rng() | 1);
        m.data()[at] = c;
        want[at] = c;
      }
      REQUIRE(::fallocate(f.get(), op.mode, static_cast<off_t>(op.off),
                          static_cast<off_t>(op.len)) == 0);
      std::memset(want.data() + op.off, 0, op.len);
      CheckMapped(m, want, 0, 16 * MiB, "after");
      CheckPread(f.get(), want, op.off & ~(kPage - 1),
                 std::min<uint64_t>(16 * MiB - (op.off & ~(kPage - 1)), op.len + 2 * kPage),
                 "pread after");
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
        if (!PreadAll(f.get(), got.data(), len, off) ||
            FirstDiff(got.data(), b.data(), len) != -1) {
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
            mapped_err =
                "mapped read of chunk " + std::to_string(c) + " differs at +" + std::to_string(d);
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
          REQUIRE(m.Sync(off, len) ==
                  0);  // the contract: direct reads see mapped writes after msync
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
          REQUIRE(::fallocate(f.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len)) ==
                  0);
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
    r.MustMirror(
        {"start", r.Job(R"({"id": "p", "target": {"path": ")" + dst + R"("}})"), "--wait"});
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
        for (int k = 0; k < 64; k++)
          sink = sink + static_cast<unsigned char>(m.data()[t * kPage + 100]);
        for (uint64_t i = 0; i < npages; i++)
          sink = sink + static_cast<unsigned char>(m.data()[i * kPage + 100]);
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
        stale = "write #" + std::to_string(i) + " to page " + std::to_string(pg) +
                ": the mapping shows #" + std::to_string(got);
    }
    stop = true;
    faulter.join();
    INFO(stale);
    CHECK(stale.empty());
  }
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
}
