// Races through the real mount (SPEC §5): a read racing with a discard of its cluster
// returns old data or zeros, never data written later elsewhere; concurrent allocating
// writes into the same clusters lose nothing and allocate each cluster once.
#include <doctest/doctest.h>

#include "integration/mount/mount_guard.h"

namespace qm = qcowfs::testing::mount;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

namespace {

constexpr uint64_t kCluster = 65536;

void* AlignedBuffer(size_t n) {
  void* p = nullptr;
  REQUIRE(posix_memalign(&p, 4096, n) == 0);
  return p;
}

}  // namespace

TEST_CASE("stress: reads of a cluster being punched and rewritten never see other clusters' data") {
  qm::RequireMountTools();
  TempDir dir;
  std::string img = dir.File("disk.qcow2"), mp = dir.File("disk.raw");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", img, "256M"}).exit_code == 0);
  qm::WriteFileText(mp, "");
  {
    qm::MountGuard g(mp, {"mount", "--threads", "4", img, mp});
    REQUIRE_MESSAGE(g.ok(), g.error());
    constexpr uint8_t kA = 0xA1, kB = 0xB2;
    // Guest cluster A (several of them, so the allocator keeps recycling their hosts).
    constexpr int kHot = 4;
    {
      int fd = open(mp.c_str(), O_RDWR | O_DIRECT);
      REQUIRE(fd >= 0);
      auto* b = static_cast<uint8_t*>(AlignedBuffer(kCluster));
      memset(b, kA, kCluster);
      for (int i = 0; i < kHot; i++) REQUIRE(pwrite(fd, b, kCluster, i * kCluster) == kCluster);
      free(b);
      close(fd);
    }
    std::atomic<bool> stop{false};
    std::atomic<uint64_t> reads{0}, bad_reads{0}, punches{0}, fresh_writes{0};
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    // Readers of A, O_DIRECT: every byte must be kA or 0.
    for (int t = 0; t < 2; t++) {
      threads.emplace_back([&, t] {
        int fd = open(mp.c_str(), O_RDONLY | O_DIRECT);
        if (fd < 0) return (void)errors++;
        auto* b = static_cast<uint8_t*>(AlignedBuffer(kCluster));
        std::mt19937 rng(t);
        while (!stop) {
          int c = static_cast<int>(rng() % kHot);
          if (pread(fd, b, kCluster, c * kCluster) != kCluster) {
            errors++;
            break;
          }
          reads++;
          for (uint64_t i = 0; i < kCluster; i++) {
            if (b[i] != kA && b[i] != 0) {
              bad_reads++;
              break;
            }
          }
        }
        free(b);
        close(fd);
      });
    }
    // Punch A and rewrite it with kA.
    threads.emplace_back([&] {
      int fd = open(mp.c_str(), O_RDWR | O_DIRECT);
      if (fd < 0) return (void)errors++;
      auto* b = static_cast<uint8_t*>(AlignedBuffer(kCluster));
      memset(b, kA, kCluster);
      std::mt19937 rng(7);
      while (!stop) {
        int c = static_cast<int>(rng() % kHot);
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c * kCluster, kCluster) != 0) errors++;
        punches++;
        if (pwrite(fd, b, kCluster, c * kCluster) != kCluster) errors++;
      }
      free(b);
      close(fd);
    });
    // Fresh clusters get kB, and are punched again so their hosts are recycled too.
    threads.emplace_back([&] {
      int fd = open(mp.c_str(), O_RDWR | O_DIRECT);
      if (fd < 0) return (void)errors++;
      auto* b = static_cast<uint8_t*>(AlignedBuffer(kCluster));
      memset(b, kB, kCluster);
      uint64_t next = 64;
      while (!stop) {
        uint64_t c = next++;
        if (c >= 4000) next = 64;
        if (pwrite(fd, b, kCluster, c * kCluster) != kCluster) errors++;
        fresh_writes++;
        if (c % 3 == 0 && fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c * kCluster, kCluster) != 0)
          errors++;
      }
      free(b);
      close(fd);
    });
    // Fixed amount of work (counts, not time): enough punches to recycle many hosts.
    while (punches < 1500 && errors == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    stop = true;
    for (auto& t : threads) t.join();
    MESSAGE(reads.load() << " reads, " << punches.load() << " punch+rewrites, " << fresh_writes.load()
                         << " fresh writes");
    CHECK(errors == 0);
    CHECK(bad_reads == 0);
    CHECK(reads > 100);
    std::string why = g.Unmount();
    CHECK_MESSAGE(why.empty(), why);
  }
  auto chk = RunCommand({"qemu-img", "check", img});
  CHECK_MESSAGE(chk.exit_code == 0, (chk.out + chk.err));
}

TEST_CASE("stress: concurrent allocating writes of distinct sectors into the same clusters") {
  qm::RequireMountTools();
  TempDir dir;
  std::string img = dir.File("disk.qcow2"), mp = dir.File("disk.raw");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", img, "64M"}).exit_code == 0);
  qm::WriteFileText(mp, "");
  constexpr int kThreads = 8, kClusters = 64;
  constexpr uint64_t kSector = kCluster / kThreads;  // 8K: each thread owns one slice
  {
    qm::MountGuard g(mp, {"mount", "--threads", "8", img, mp});
    REQUIRE_MESSAGE(g.ok(), g.error());
    std::vector<std::thread> threads;
    std::atomic<int> errors{0};
    for (int t = 0; t < kThreads; t++) {
      threads.emplace_back([&, t] {
        int fd = open(mp.c_str(), O_RDWR | O_DIRECT);
        if (fd < 0) return (void)errors++;
        auto* b = static_cast<uint8_t*>(AlignedBuffer(kSector));
        for (int c = 0; c < kClusters; c++) {
          memset(b, 0x10 + t, kSector);
          if (pwrite(fd, b, kSector, c * kCluster + t * kSector) != static_cast<ssize_t>(kSector)) errors++;
        }
        free(b);
        close(fd);
      });
    }
    for (auto& t : threads) t.join();
    CHECK(errors == 0);
    std::string why = g.Unmount();
    CHECK_MESSAGE(why.empty(), why);
  }
  auto chk = RunCommand({"qemu-img", "check", "--output=json", img});
  INFO(chk.out << chk.err);
  REQUIRE(chk.exit_code == 0);
  auto j = nlohmann::json::parse(chk.out);
  CHECK(j.value("leaks", 0) == 0);
  CHECK(j.value("corruptions", 0) == 0);
  CHECK(j.at("allocated-clusters").get<int>() == kClusters);
  // Every slice holds its writer's pattern.
  std::string raw = dir.File("out.raw");
  REQUIRE(RunCommand({"qemu-img", "convert", "-O", "raw", img, raw}).exit_code == 0);
  std::ifstream in(raw, std::ios::binary);
  std::vector<uint8_t> c(kCluster);
  int wrong = 0;
  for (int k = 0; k < kClusters; k++) {
    in.read(reinterpret_cast<char*>(c.data()), kCluster);
    for (int t = 0; t < kThreads; t++)
      for (uint64_t i = 0; i < kSector; i++)
        if (c[t * kSector + i] != 0x10 + t) {
          wrong++;
          break;
        }
  }
  CHECK(wrong == 0);
}
