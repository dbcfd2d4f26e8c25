// POSIX I/O through a real mount (SPEC §3: read, write, stat), with a raw shadow file as
// the model and qemu-img check/compare as the oracle once unmounted.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

struct AlignedBuf {
  explicit AlignedBuf(size_t n) : size(n) {
    void* p = nullptr;
    REQUIRE(posix_memalign(&p, 4096, n) == 0);
    data.reset(static_cast<char*>(p));
  }
  struct Free {
    void operator()(char* p) const { free(p); }
  };
  std::unique_ptr<char, Free> data;
  size_t size;
};

// One random-I/O run on an image of the given cluster size: writes of every shape,
// mirrored into ref.raw, read back through the mount along the way and at the end.
void RandomIoRun(const std::string& cluster_size, uint64_t seed) {
  INFO("cluster_size=" << cluster_size << " seed=" << seed << " (QCOWFS_TEST_SEED to replay)");
  Scratch s;
  const uint64_t size = 64 * MiB;
  const uint64_t cluster = cluster_size == "4K" ? 4096 : 65536;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M", "cluster_size=" + cluster_size);
  // Existing data, so writes land on allocated, partly allocated and unallocated clusters.
  QemuIo(img, {"write -P 0x5a 0 4M", "write -P 0xa5 20M 1M", "write -P 0x33 40955 70000"});
  MakeRaw(ref, size);
  {
    Fd r(ref, O_RDWR);
    std::vector<char> a(4 * MiB, 0x5a), b(MiB, static_cast<char>(0xa5)), c(70000, 0x33);
    REQUIRE(PwriteAll(r.get(), a.data(), a.size(), 0));
    REQUIRE(PwriteAll(r.get(), b.data(), b.size(), 20 * MiB));
    REQUIRE(PwriteAll(r.get(), c.data(), c.size(), 40955));
  }

  MountGuard g(mp, {"mount", img, mp, "--threads", "2"});
  REQUIRE_MOUNTED(g);
  std::mt19937_64 rng(seed);
  Fd f(mp, O_RDWR);
  REQUIRE_MESSAGE(f.valid(), strerror(errno));
  Fd fdirect(mp, O_RDWR | O_DIRECT);
  REQUIRE_MESSAGE(fdirect.valid(), "O_DIRECT open: " << strerror(errno));
  Fd r(ref, O_RDWR);

  auto check_range = [&](uint64_t off, size_t len) {
    std::vector<char> got(len), want(len);
    REQUIRE_MESSAGE(PreadAll(f.get(), got.data(), len, off), "pread @" << off << ": " << strerror(errno));
    REQUIRE(PreadAll(r.get(), want.data(), len, off));
    long long d = FirstDiff(got.data(), want.data(), len);
    INFO("read back [" << off << ", +" << len << ") differs at +" << d);
    CHECK(d == -1);
  };

  for (int op = 0; op < 120; op++) {
    int kind = static_cast<int>(rng() % 10);
    uint64_t off = 0;
    size_t len = 0;
    bool direct = false;
    switch (kind) {
      case 0:  // one byte anywhere
        len = 1;
        off = rng() % size;
        break;
      case 1:
      case 2:
      case 3: {  // small write straddling a cluster boundary
        len = 2 + rng() % (3 * cluster);
        uint64_t boundary = cluster * (1 + rng() % (size / cluster - 4));
        off = boundary - 1 - rng() % std::min<uint64_t>(len - 1, cluster);
        break;
      }
      case 4:
      case 5:  // medium, unaligned
        len = 1 + rng() % (256 * KiB);
        off = rng() % (size - len);
        break;
      case 6:
      case 7:  // more than 1 MiB (several FUSE requests)
        len = MiB + 1 + rng() % (2 * MiB);
        off = rng() % (size - len);
        break;
      default:  // O_DIRECT, 4K aligned
        direct = true;
        len = 4096 * (1 + rng() % 512);
        off = 4096 * (rng() % ((size - len) / 4096));
        break;
    }
    INFO("op " << op << " kind " << kind << " write [" << off << ", +" << len << ")" << std::string(direct ? " O_DIRECT" : ""));
    std::vector<char> data = RandomBytes(rng, len);
    if (direct) {
      AlignedBuf ab(len);
      std::memcpy(ab.data.get(), data.data(), len);
      REQUIRE_MESSAGE(PwriteAll(fdirect.get(), ab.data.get(), len, off), strerror(errno));
    } else {
      // One pwrite call: a full-length write inside the file must not be short.
      ssize_t n = ::pwrite(f.get(), data.data(), len, static_cast<off_t>(off));
      REQUIRE_MESSAGE(n == static_cast<ssize_t>(len), "pwrite returned " << n << ": " << strerror(errno));
    }
    REQUIRE(PwriteAll(r.get(), data.data(), len, off));
    // Read back around the write (both edges) right away.
    uint64_t lo = off >= cluster ? off - cluster : 0;
    uint64_t hi = std::min(size, off + len + cluster);
    check_range(lo, std::min<uint64_t>(hi - lo, 4 * MiB));
    if (hi - lo > 4 * MiB) check_range(hi - 4 * MiB, 4 * MiB);
    if (op % 40 == 39) REQUIRE(::fsync(f.get()) == 0);
  }
  REQUIRE(::fdatasync(f.get()) == 0);
  REQUIRE(::fsync(fdirect.get()) == 0);
  // The whole file through the mount, in 8 MiB pieces.
  for (uint64_t off = 0; off < size; off += 8 * MiB) check_range(off, 8 * MiB);
  f.Close();
  fdirect.Close();
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
  CHECK(VirtualSize(img) == size);
}

}  // namespace

TEST_CASE("mount io: random writes across cluster boundaries match a raw shadow (64K clusters)") {
  RequireMountTools();
  RandomIoRun("64K", TestSeed(0x64c0ffee));
}

TEST_CASE("mount io: random writes across cluster boundaries match a raw shadow (4K clusters)") {
  RequireMountTools();
  RandomIoRun("4K", TestSeed(0x4c0ffee));
}

TEST_CASE("mount io: concurrent allocating writes into the same clusters lose nothing") {
  RequireMountTools();
  Scratch s;
  const uint64_t size = 32 * MiB, span = 16 * MiB, cluster = 64 * KiB;
  const int kThreads = 4;
  const size_t slot = cluster / kThreads;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, "32M");
  MountGuard g(mp, {"mount", img, mp, "--threads", "4"});
  REQUIRE_MOUNTED(g);
  std::vector<char> model(size, 0);
  std::mt19937_64 rng(TestSeed(77));
  for (uint64_t i = 0; i < span; i++) model[i] = static_cast<char>(rng());
  std::vector<std::thread> threads;
  std::vector<int> errors(kThreads, 0);
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      Fd f(mp, O_RDWR);
      if (!f.valid()) {
        errors[t] = errno;
        return;
      }
      // Every thread writes its own quarter of every cluster: all four race to allocate
      // each cluster. Half the threads go backwards so they meet in the middle.
      for (uint64_t c = 0; c < span / cluster; c++) {
        uint64_t ci = (t % 2) ? span / cluster - 1 - c : c;
        uint64_t off = ci * cluster + t * slot;
        if (!PwriteAll(f.get(), model.data() + off, slot, off)) {
          errors[t] = errno;
          return;
        }
      }
      if (::fsync(f.get()) != 0) errors[t] = errno;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; t++) CHECK_MESSAGE(errors[t] == 0, "thread " << t << ": " << strerror(errors[t]));
  std::vector<char> got = ReadRange(mp, 0, size);
  long long d = FirstDiff(got.data(), model.data(), size);
  CHECK_MESSAGE(d == -1, "mounted file differs from the model at " << d);
  CHECK_UNMOUNTS(g);
  {
    Fd r(ref, O_RDWR | O_CREAT | O_TRUNC);
    REQUIRE(PwriteAll(r.get(), model.data(), size, 0));
  }
  CheckClean(img);
  CheckSameContent(img, ref);
  // Each cluster allocated once: 16 MiB of data, not 4x.
  auto info = QemuInfo(img);
  CHECK(info.at("actual-size").get<uint64_t>() < span + 2 * MiB);
}

TEST_CASE("mount io: reads are short at EOF, writes at EOF fail with ENOSPC, straddling writes are short") {
  RequireMountTools();
  Scratch s;
  const uint64_t size = 10 * MiB + 512;  // the last cluster is partial
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, std::to_string(size));
  QemuIo(img, {"write -P 0x77 9M " + std::to_string(size - 9 * MiB)});
  MakeRaw(ref, size);
  {
    Fd r(ref, O_RDWR);
    std::vector<char> a(size - 9 * MiB, 0x77);
    REQUIRE(PwriteAll(r.get(), a.data(), a.size(), 9 * MiB));
  }
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  Fd r(ref, O_RDWR);
  struct stat st;
  REQUIRE(::fstat(f.get(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_size) == size);

  std::vector<char> buf(8192);
  CHECK(::pread(f.get(), buf.data(), 8192, static_cast<off_t>(size - 100)) == 100);
  CHECK(AllBytes(std::vector<char>(buf.begin(), buf.begin() + 100), 0x77));
  CHECK(::pread(f.get(), buf.data(), 8192, static_cast<off_t>(size)) == 0);
  CHECK(::pread(f.get(), buf.data(), 8192, static_cast<off_t>(size + MiB)) == 0);

  errno = 0;
  CHECK(::pwrite(f.get(), "x", 1, static_cast<off_t>(size)) == -1);
  CHECK(errno == ENOSPC);
  errno = 0;
  CHECK(::pwrite(f.get(), buf.data(), 4096, static_cast<off_t>(size + 4096)) == -1);
  CHECK(errno == ENOSPC);
  {
    Fd app(mp, O_WRONLY | O_APPEND);
    REQUIRE(app.valid());
    errno = 0;
    CHECK(::write(app.get(), "y", 1) == -1);
    CHECK(errno == ENOSPC);
  }

  std::mt19937_64 rng(5);
  std::vector<char> tail = RandomBytes(rng, 8192);
  CHECK(::pwrite(f.get(), tail.data(), 8192, static_cast<off_t>(size - 100)) == 100);
  REQUIRE(PwriteAll(r.get(), tail.data(), 100, size - 100));
  // Several FUSE requests, the last one straddling EOF: exactly the in-file part is written.
  std::vector<char> big = RandomBytes(rng, 3 * MiB);
  uint64_t big_off = size - 3 * MiB / 2;
  CHECK(::pwrite(f.get(), big.data(), big.size(), static_cast<off_t>(big_off)) == static_cast<ssize_t>(3 * MiB / 2));
  REQUIRE(PwriteAll(r.get(), big.data(), 3 * MiB / 2, big_off));
  REQUIRE(::fsync(f.get()) == 0);
  REQUIRE(::fstat(f.get(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_size) == size);
  std::vector<char> got = ReadRange(mp, big_off, 3 * MiB / 2);
  CHECK(FirstDiff(got.data(), big.data(), got.size()) == -1);
  f.Close();
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CHECK(VirtualSize(img) == size);
  CheckSameContent(img, ref);
}

TEST_CASE("mount io: stat follows the image: size, st_blocks, mode and owner") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");
  REQUIRE(::chmod(img.c_str(), 0640) == 0);
  REQUIRE(::chown(img.c_str(), 1234, 5678) == 0);
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  struct stat st;
  REQUIRE(::stat(mp.c_str(), &st) == 0);
  CHECK(S_ISREG(st.st_mode));
  CHECK((st.st_mode & 07777) == 0640);
  CHECK(st.st_uid == 1234u);
  CHECK(st.st_gid == 5678u);
  CHECK(static_cast<uint64_t>(st.st_size) == 64 * MiB);
  const uint64_t before = static_cast<uint64_t>(st.st_blocks) * 512;
  CHECK(before < MiB);  // nothing written yet: metadata only

  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    std::mt19937_64 rng(9);
    std::vector<char> data = RandomBytes(rng, 4 * MiB);
    REQUIRE(PwriteAll(f.get(), data.data(), data.size(), 8 * MiB + 4096));
    REQUIRE(::fsync(f.get()) == 0);
  }
  uint64_t after = 0;
  WaitFor(
      [&] {
        ::stat(mp.c_str(), &st);
        after = static_cast<uint64_t>(st.st_blocks) * 512;
        return after >= before + 4 * MiB;
      },
      3000);
  INFO("st_blocks*512 before " << before << " after " << after);
  CHECK(after >= before + 4 * MiB);
  CHECK(after <= before + 4 * MiB + 2 * 64 * KiB + MiB);  // data + one partial cluster each side + metadata
  CHECK(static_cast<uint64_t>(st.st_size) == 64 * MiB);

  // Mode and owner are read from the image file, also while mounted.
  REQUIRE(::chmod(img.c_str(), 0600) == 0);
  REQUIRE(::chown(img.c_str(), 4321, 8765) == 0);
  bool follows = WaitFor(
      [&] {
        ::stat(mp.c_str(), &st);
        return (st.st_mode & 07777) == 0600 && st.st_uid == 4321u && st.st_gid == 8765u;
      },
      3000);
  INFO("mode " << std::oct << (st.st_mode & 07777) << std::dec << " uid " << st.st_uid << " gid " << st.st_gid);
  CHECK(follows);
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}

// The workers' device polling (fuse/kernel_io.h) parks all but one idle worker and
// wakes them on a backlog or a request that may block. A lost wakeup shows as a hang
// (the ctest timeout), a wrong handoff as lost or misplaced data: 8 clients mix reads,
// writes, fsync and punch holes on their own regions, under three polling settings. One
// request in four moves 512 KiB, so the workers also switch between polling and blocking
// reads (no polling after a request over 128 KiB).
TEST_CASE("mount io: device polling keeps every request served (mixed ops, 8 clients)") {
  RequireMountTools();
  for (const char* poll : {"0", "50", "2000"}) {
    INFO("--poll-us " << poll);
    Scratch s;
    const uint64_t size = 32 * MiB, region = size / 8, small = 16 * KiB, large = 512 * KiB;
    std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
    QemuImgCreate(img, "32M");
    MountGuard g(mp, {"mount", img, mp, "--threads", "3", "--poll-us", poll});
    REQUIRE_MOUNTED(g);
    std::vector<char> model(size, 0);
    std::vector<std::thread> clients;
    std::vector<std::string> errors(8);
    for (int t = 0; t < 8; t++) {
      clients.emplace_back([&, t] {
        std::mt19937_64 rng(TestSeed(900 + t));
        Fd f(mp, O_RDWR);
        if (!f.valid()) {
          errors[t] = std::string("open: ") + strerror(errno);
          return;
        }
        std::vector<char> buf(large);
        for (int i = 0; i < 300 && errors[t].empty(); i++) {
          const uint64_t block = rng() % 4 == 0 ? large : small;
          uint64_t off = t * region + (rng() % (region / block)) * block;
          char* m = model.data() + off;
          switch (rng() % 6) {
            case 0:
            case 1:
              for (uint64_t k = 0; k < block; k++) buf[k] = static_cast<char>(rng());
              if (!PwriteAll(f.get(), buf.data(), block, off)) errors[t] = std::string("write: ") + strerror(errno);
              std::memcpy(m, buf.data(), block);
              break;
            case 2:
            case 3:
              if (::pread(f.get(), buf.data(), block, static_cast<off_t>(off)) != static_cast<ssize_t>(block))
                errors[t] = std::string("read: ") + strerror(errno);
              else if (std::memcmp(buf.data(), m, block) != 0)
                errors[t] = "read at " + std::to_string(off) + " differs from what was written";
              break;
            case 4:
              if (::fsync(f.get()) != 0) errors[t] = std::string("fsync: ") + strerror(errno);
              break;
            case 5:
              if (::fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), block) != 0)
                errors[t] = std::string("punch: ") + strerror(errno);
              std::memset(m, 0, block);
              break;
          }
        }
      });
    }
    for (auto& c : clients) c.join();
    for (int t = 0; t < 8; t++) CHECK_MESSAGE(errors[t].empty(), "client " << t << ": " << errors[t]);
    std::vector<char> got = ReadRange(mp, 0, size);
    CHECK_MESSAGE(FirstDiff(got.data(), model.data(), size) == -1, "mounted file differs from the model");
    CHECK_UNMOUNTS(g);
    {
      Fd r(ref, O_RDWR | O_CREAT | O_TRUNC);
      REQUIRE(PwriteAll(r.get(), model.data(), size, 0));
    }
    CheckClean(img);
    CheckSameContent(img, ref);
  }
}

// The open reply asks for FOPEN_PARALLEL_DIRECT_WRITES (fuse/kernel_io.h), so the kernel
// sends concurrent direct writes to one file to the daemon together instead of one at a
// time under the inode lock (4 writers then did half the IOPS). Runs on the suite's
// transport (CI: legacy, then ring); ring_test.cc checks the ring explicitly.
TEST_CASE("mount io: writes from several threads to the mounted file reach the daemon in parallel") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  std::string why;
  unsigned most = MaxConcurrentWrites(mp, 4, &why);
  REQUIRE_MESSAGE(why.empty(), why);
  CHECK_MESSAGE(most >= 2, "at most " << most << " request(s) outstanding: the kernel serialized the writes");
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}
