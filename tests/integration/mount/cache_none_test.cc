// --cache none (O_DIRECT), always, whatever QCOWFS_TEST_CACHE says: the daemon's fds of
// the image, its backing file and its external data file carry O_DIRECT (fdinfo), status
// shows the mode, concurrent unaligned writes through the mount to 512-byte-cluster images
// (several clusters per 4K host block, RMW forced to 4K) read back and pass qemu-img
// check/compare, and a filesystem that refuses O_DIRECT fails the mount with one line.
#include <doctest/doctest.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

constexpr unsigned kODirect = 040000;
constexpr unsigned kOPath = 010000000;

// fd flags (octal "flags:" of /proc/PID/fdinfo/N) of every fd of pid open on `path`.
std::vector<unsigned> FdFlags(pid_t pid, const std::string& path) {
  std::vector<unsigned> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  DIR* d = opendir(dir.c_str());
  REQUIRE(d != nullptr);
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    char target[PATH_MAX];
    ssize_t n = readlink((dir + "/" + e->d_name).c_str(), target, sizeof(target) - 1);
    if (n <= 0) continue;
    target[n] = '\0';
    if (path != target) continue;
    std::string info = ReadFileText("/proc/" + std::to_string(pid) + "/fdinfo/" + e->d_name);
    auto pos = info.find("flags:");
    REQUIRE(pos != std::string::npos);
    out.push_back(static_cast<unsigned>(std::stoul(info.substr(pos + 6), nullptr, 8)));
  }
  closedir(d);
  return out;
}

// Every I/O fd (not O_PATH) on path has O_DIRECT (or none has, when !direct); at least one.
void CheckDirect(pid_t pid, const std::string& path, bool direct) {
  INFO(path);
  int io_fds = 0;
  for (unsigned f : FdFlags(pid, path)) {
    if (f & kOPath) continue;
    io_fds++;
    CHECK(((f & kODirect) != 0) == direct);
  }
  CHECK(io_fds >= 1);
}

// Threads write disjoint pieces: thread t owns the 512-byte guest clusters i with
// i % threads == t, and writes each whole, then an unaligned 100-byte piece inside it.
void ConcurrentPieces(const std::string& file, const std::string& ref, uint64_t clusters, int threads) {
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) {
    ts.emplace_back([&, t] {
      Fd fd(file, O_RDWR);
      Fd rf(ref, O_RDWR);
      REQUIRE(fd.valid());
      REQUIRE(rf.valid());
      std::mt19937_64 rng(1000 + t);
      for (uint64_t i = static_cast<uint64_t>(t); i < clusters; i += static_cast<uint64_t>(threads)) {
        auto data = RandomBytes(rng, 512);
        CHECK(PwriteAll(fd.get(), data.data(), data.size(), i * 512));
        CHECK(PwriteAll(rf.get(), data.data(), data.size(), i * 512));
        auto small = RandomBytes(rng, 100);
        const uint64_t off = i * 512 + 1 + rng() % 400;
        CHECK(PwriteAll(fd.get(), small.data(), small.size(), off));
        CHECK(PwriteAll(rf.get(), small.data(), small.size(), off));
      }
    });
  }
  for (auto& t : ts) t.join();
}

void CheckReadsLike(const std::string& file, const std::string& ref) {
  const uint64_t size = FileSize(ref);
  auto a = ReadRange(file, 0, size);
  auto b = ReadRange(ref, 0, size);
  REQUIRE(a.size() == b.size());
  long long d = FirstDiff(a.data(), b.data(), a.size());
  CHECK_MESSAGE(d < 0, "first difference at byte " << d);
}

}  // namespace

TEST_CASE("cache none: O_DIRECT on image, backing and data file; 512-byte clusters; check/compare") {
  RequireMountTools();
  // The config decides the modes here, not the test-wide --cache.
  struct NoTestCache {
    std::string saved = TestCacheMode();
    NoTestCache() { unsetenv("QCOWFS_TEST_CACHE"); }
    ~NoTestCache() {
      if (!saved.empty()) setenv("QCOWFS_TEST_CACHE", saved.c_str(), 1);
    }
  } no_test_cache;
  Scratch s;
  const std::string base = s.File("base.qcow2"), top = s.File("top.qcow2"), data = s.File("top.data");
  const std::string small = s.File("small.qcow2"), wb = s.File("wb.qcow2");
  QemuImgCreate(base, "4M", "cluster_size=65536");
  QemuIo(base, {"write -P 0x5c 0 4M"});
  QemuImgCreate(top, "4M", "cluster_size=512,data_file=" + data, {"-b", base, "-F", "qcow2"});
  QemuImgCreate(small, "1M", "cluster_size=512");
  QemuImgCreate(wb, "1M");
  const std::string top_ref = s.File("top.ref"), small_ref = s.File("small.ref");
  Must({"qemu-img", "convert", "-O", "raw", top, top_ref});
  MakeRaw(small_ref, 1 * MiB);

  const std::string mnt = s.DirMountpoint();
  const std::string sock = s.File("ctl.sock");
  const std::string cfg = s.File("mount.json");
  // Top-level "cache": "none", one image overriding it with "writeback".
  WriteFileText(cfg, nlohmann::json{{"mountpoint", mnt},
                                    {"socket", sock},
                                    {"cache", "none"},
                                    {"images",
                                     {{{"path", top}, {"name", "top.raw"}},
                                      {{"path", small}, {"name", "small.raw"}},
                                      {{"path", wb}, {"name", "wb.raw"}, {"cache", "writeback"}}}}}
                         .dump());
  RunOpts o;
  o.env["QCOWFS_TEST_DIO_ALIGN"] = "4096";  // 4K read-modify-write on a 512-byte-sector host
  o.env["QCOWFS_TEST_CACHE"] = std::nullopt;
  {
    MountGuard g(mnt, {"mount", "--config", cfg}, sock, o);
    REQUIRE_MESSAGE(g.ok(), g.error());
    CheckDirect(g.pid(), top, true);
    CheckDirect(g.pid(), data, true);
    CheckDirect(g.pid(), base, true);
    CheckDirect(g.pid(), small, true);
    CheckDirect(g.pid(), wb, false);
    auto st = g.StatusJson();
    REQUIRE(st.at("images").size() == 3);
    CHECK(st["images"][0]["cache_mode"] == "none");
    CHECK(st["images"][1]["cache_mode"] == "none");
    CHECK(st["images"][2]["cache_mode"] == "writeback");
    CHECK(Contains(g.Status(false).out, "cache: none (O_DIRECT)"));

    ConcurrentPieces(mnt + "/small.raw", small_ref, 2048, 8);
    ConcurrentPieces(mnt + "/top.raw", top_ref, 8192, 8);
    {
      Fd f(mnt + "/top.raw", O_RDWR);
      REQUIRE(f.valid());
      CHECK(::fdatasync(f.get()) == 0);
    }
    CheckReadsLike(mnt + "/small.raw", small_ref);
    CheckReadsLike(mnt + "/top.raw", top_ref);
    CHECK_UNMOUNTS(g);
  }
  CheckClean(small);
  CheckClean(top);
  CheckSameContent(small, small_ref);
  CheckSameContent(top, top_ref);
}

TEST_CASE("cache none: a filesystem without O_DIRECT fails the mount with one line") {
  RequireMountTools();
  Scratch s;
  const std::string host = s.File("ramfs");
  REQUIRE(::mkdir(host.c_str(), 0755) == 0);
  if (::mount("qcowfs-test-ramfs", host.c_str(), "ramfs", 0, nullptr) != 0) {
    MESSAGE("cannot mount ramfs (" << strerror(errno) << "); skipped");
    return;
  }
  struct Umount {
    std::string p;
    ~Umount() { ::umount2(p.c_str(), MNT_DETACH); }
  } um{host};
  const std::string img = host + "/disk.qcow2";
  QemuImgCreate(img, "1M");
  const std::string mp = s.FileMountpoint();
  const std::string before = ReadFileText(img);
  std::vector<std::string> argv = {Bin(), "mount", "--cache", "none", img, mp};
  CmdResult r = RunTimed(argv, WithTimeout(30000));
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 1);
  CHECK(CountLines(r.err) == 1);
  CHECK(Contains(r.err, img));
  CHECK(Contains(r.err, "O_DIRECT"));
  CHECK_FALSE(IsMounted(mp));
  CHECK(ReadFileText(img) == before);
  // The page cache mode still mounts it.
  {
    MountGuard g(mp, {"mount", "--cache", "writeback", img, mp});
    REQUIRE_MESSAGE(g.ok(), g.error());
    CHECK(g.StatusJson()["images"][0]["cache_mode"] == "writeback");
    CHECK_UNMOUNTS(g);
  }
  CheckClean(img);
}
