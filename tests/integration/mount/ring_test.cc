// FUSE over io_uring (--transport, fuse/ring.h): a mount that takes the ring when the
// kernel offers it, I/O through it from several threads with verification, clean
// unmount under load, and the fallback to /dev/fuse with the kernel's parameter off.
//
// The kernel offers the ring only with /sys/module/fuse/parameters/enable_uring = Y
// (Linux 6.14+, CONFIG_FUSE_IO_URING). These tests set it (root) and put back what they
// found; where the parameter does not exist or cannot be written they say so and skip.
// The parameter is global: a mount another process starts meanwhile sees it too.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

constexpr const char* kParam = "/sys/module/fuse/parameters/enable_uring";

// Sets the kernel's enable_uring parameter for the test's lifetime; restores the value it
// found. why() says why it could not (then the test skips).
class UringParam {
 public:
  explicit UringParam(bool on) {
    std::string old = ReadFileText(kParam);
    if (access(kParam, F_OK) != 0) {
      why_ = std::string(kParam) + " does not exist: this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)";
      return;
    }
    old_ = old.substr(0, old.find('\n'));
    if (!Write(on ? "Y" : "N")) {
      why_ = std::string("cannot write ") + kParam + " (needs root): " + strerror(errno);
      return;
    }
    changed_ = true;
  }
  ~UringParam() {
    if (changed_) Write(old_);
  }
  UringParam(const UringParam&) = delete;
  UringParam& operator=(const UringParam&) = delete;
  bool ok() const { return why_.empty(); }
  const std::string& why() const { return why_; }

 private:
  static bool Write(const std::string& v) {
    int fd = ::open(kParam, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return false;
    bool ok = ::write(fd, v.data(), v.size()) == static_cast<ssize_t>(v.size());
    ::close(fd);
    return ok;
  }
  std::string old_;
  std::string why_;
  bool changed_ = false;
};

// The transport the daemon reports, once it is not "legacy" or after timeout_ms.
std::string WaitTransport(MountGuard& g, const std::string& want, int timeout_ms = 5000) {
  std::string t;
  WaitFor(
      [&] {
        t = g.StatusJson().value("transport", std::string());
        return t == want;
      },
      timeout_ms);
  return t;
}

// Writes, reads back and compares random blocks (4 KiB .. 1 MiB) in [base, base+span)
// from one thread; returns "" or what differed.
std::string VerifyRegion(const std::string& path, uint64_t base, uint64_t span, uint64_t seed, int rounds) {
  Fd fd(path, O_RDWR);
  if (!fd.valid()) return "open: " + std::string(strerror(errno));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < rounds; i++) {
    size_t len = size_t{4096} << (rng() % 9);  // 4 KiB .. 1 MiB
    uint64_t off = base + (rng() % ((span - len) / 4096)) * 4096;
    std::vector<char> data = RandomBytes(rng, len);
    if (!PwriteAll(fd.get(), data.data(), len, off)) return "pwrite at " + std::to_string(off) + ": " + strerror(errno);
    std::vector<char> back(len);
    if (!PreadAll(fd.get(), back.data(), len, off)) return "pread at " + std::to_string(off) + ": " + strerror(errno);
    long long d = FirstDiff(data.data(), back.data(), len);
    if (d >= 0) return "read back differs at " + std::to_string(off + static_cast<uint64_t>(d));
  }
  return "";
}

}  // namespace

TEST_CASE("ring: a mount takes FUSE over io_uring and serves reads, writes, fallocate, fsync, SEEK_DATA through it") {
  RequireMountTools();
  UringParam param(true);
  if (!param.ok()) {
    MESSAGE("SKIPPED (FUSE over io_uring not testable here): " << param.why());
    return;
  }
  Scratch s;
  std::string img = s.File("img.qcow2"), sock = s.File("sock"), mp = s.FileMountpoint();
  QemuImgCreate(img, "256M");
  MountGuard g(mp, {"mount", img, mp, "--transport", "ring", "--socket", sock}, sock);
  REQUIRE_MESSAGE(g.ok(), g.error());
  REQUIRE(WaitTransport(g, "ring") == "ring");
  CHECK(Contains(g.Status(false).out, "transport: ring"));

  SUBCASE("four threads write and read back random blocks") {
    std::vector<std::string> errs(4);
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; t++)
      ts.emplace_back([&, t] { errs[t] = VerifyRegion(mp, uint64_t(t) * 32 * MiB, 32 * MiB, TestSeed(7) + t, 200); });
    for (auto& t : ts) t.join();
    for (int t = 0; t < 4; t++) CHECK_MESSAGE(errs[t].empty(), "thread " << t << ": " << errs[t]);
  }

  SUBCASE("fallocate punch/zero, fsync and SEEK_DATA/SEEK_HOLE") {
    Fd fd(mp, O_RDWR);
    REQUIRE(fd.valid());
    std::vector<char> ones(MiB, '\x5a');
    REQUIRE(PwriteAll(fd.get(), ones.data(), ones.size(), 200 * MiB));
    REQUIRE(::fsync(fd.get()) == 0);
    CHECK(::lseek(fd.get(), 150 * MiB, SEEK_DATA) == static_cast<off_t>(200 * MiB));
    CHECK(::lseek(fd.get(), 200 * MiB, SEEK_HOLE) == static_cast<off_t>(201 * MiB));
    REQUIRE(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 200 * MiB, 256 * KiB) == 0);
    REQUIRE(::fallocate(fd.get(), FALLOC_FL_ZERO_RANGE, 200 * MiB + 512 * KiB, 128 * KiB) == 0);
    REQUIRE(::fdatasync(fd.get()) == 0);
    std::vector<char> back(MiB);
    REQUIRE(PreadAll(fd.get(), back.data(), back.size(), 200 * MiB));
    for (size_t i = 0; i < MiB; i += 4096) {
      bool zero = i < 256 * KiB || (i >= 512 * KiB && i < 640 * KiB);
      INFO("offset " << i);
      CHECK(back[i] == (zero ? '\0' : '\x5a'));
    }
    CHECK(::lseek(fd.get(), 200 * MiB, SEEK_DATA) == static_cast<off_t>(200 * MiB + 256 * KiB));
  }

  auto j = g.StatusJson();
  CHECK(j["transport"] == "ring");
  CHECK(j["images"][0]["requests"]["writes"].get<uint64_t>() > 0);
  CHECK(g.Unmount() == "");
  CheckClean(img);
}

// An OPEN answered through a ring entry gets FOPEN_PARALLEL_DIRECT_WRITES as one answered
// through /dev/fuse does: without it the kernel runs the writes of 4 threads one at a
// time (the ring did half of legacy's 4-job rewrite IOPS).
TEST_CASE("ring: writes from several threads reach the daemon in parallel over the ring") {
  RequireMountTools();
  UringParam param(true);
  if (!param.ok()) {
    MESSAGE("SKIPPED (FUSE over io_uring not testable here): " << param.why());
    return;
  }
  Scratch s;
  std::string img = s.File("img.qcow2"), sock = s.File("sock"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");
  MountGuard g(mp, {"mount", img, mp, "--transport", "ring", "--socket", sock}, sock);
  REQUIRE_MESSAGE(g.ok(), g.error());
  REQUIRE(WaitTransport(g, "ring") == "ring");
  std::string why;
  unsigned most = MaxConcurrentWrites(mp, 4, &why);
  REQUIRE_MESSAGE(why.empty(), why);
  CHECK_MESSAGE(most >= 2, "at most " << most << " request(s) outstanding: the kernel serialized the writes");
  CHECK(g.Unmount() == "");
  CheckClean(img);
}

TEST_CASE("ring: unmount and SIGTERM under load end the daemon and its ring threads") {
  RequireMountTools();
  UringParam param(true);
  if (!param.ok()) {
    MESSAGE("SKIPPED (FUSE over io_uring not testable here): " << param.why());
    return;
  }
  Scratch s;
  std::string img = s.File("img.qcow2"), sock = s.File("sock"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");
  MountGuard g(mp, {"mount", img, mp, "--transport", "ring", "--socket", sock}, sock);
  REQUIRE_MESSAGE(g.ok(), g.error());
  REQUIRE(WaitTransport(g, "ring") == "ring");

  std::atomic<bool> stop{false};
  std::atomic<uint64_t> ops{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; t++)
    ts.emplace_back([&, t] {
      Fd fd(mp, O_RDWR);
      if (!fd.valid()) return;
      std::vector<char> buf(64 * KiB, static_cast<char>('a' + t));
      std::mt19937_64 rng(t);
      while (!stop.load()) {
        uint64_t off = (rng() % 1000) * 64 * KiB;
        bool ok = (rng() & 1) ? PwriteAll(fd.get(), buf.data(), buf.size(), off)
                              : PreadAll(fd.get(), buf.data(), buf.size(), off);
        if (t == 0 && (rng() % 64) == 0) ok = ok && ::fsync(fd.get()) == 0;
        if (!ok) break;  // the mount went away
        ops++;
      }
    });
  WaitFor([&] { return ops.load() > 2000; }, 10000);
  CHECK(ops.load() > 0);

  SUBCASE("fusermount3 -u right after the load stops") {
    stop = true;
    for (auto& t : ts) t.join();
    CHECK(g.Unmount() == "");
    CHECK(g.exit_code() == 0);
  }
  SUBCASE("SIGTERM with requests in flight") {
    CHECK(g.SignalAndWait(SIGTERM) == "");
    stop = true;
    for (auto& t : ts) t.join();  // their requests fail once the connection is gone
  }
  CheckClean(img);
}

TEST_CASE("ring: with the kernel's parameter off, auto serves through /dev/fuse and ring refuses to mount") {
  RequireMountTools();
  UringParam param(false);
  if (!param.ok()) {
    MESSAGE("SKIPPED (FUSE over io_uring not testable here): " << param.why());
    return;
  }
  Scratch s;
  std::string img = s.File("img.qcow2"), sock = s.File("sock"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");

  SUBCASE("auto falls back and works") {
    MountGuard g(mp, {"mount", img, mp, "--transport", "auto", "--socket", sock}, sock);
    REQUIRE_MESSAGE(g.ok(), g.error());
    CHECK(g.StatusJson()["transport"] == "legacy");
    CHECK(VerifyRegion(mp, 0, 32 * MiB, TestSeed(3), 50) == "");
    CHECK(g.Unmount() == "");
  }
  SUBCASE("ring fails with one line and mounts nothing") {
    std::vector<std::string> argv = {Bin(), "mount", img, mp, "-o", "transport=ring", "--socket", sock};
    CmdResult r = RunTimed(argv, WithTimeout(30000));
    INFO(Describe(argv, r));
    CHECK(r.exit_code == 1);
    CHECK(CountLines(r.err) == 1);
    CHECK(Contains(r.err, "transport ring"));
    CHECK(Contains(r.err, "enable_uring"));
    CHECK_FALSE(IsMounted(mp));
  }
  CheckClean(img);
}
