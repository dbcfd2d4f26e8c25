// The mirror integration tests' rig: a scratch directory with the source image, a file
// mountpoint and a control socket, the `qcowfs mirror` CLI run against that socket, job
// and target JSON, a guest writer thread, and the oracles for a finished copy.
#pragma once

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "integration/mount/mount_guard.h"
#include "support/nbd_servers.h"

namespace qcowfs::testing::mount {

struct MirrorRig {
  Scratch s;
  std::string img = s.File("src.qcow2"), mp = s.FileMountpoint(), sock = s.File("ctl.sock");
  std::string nsock = s.File("nbdkit.sock");
  int n = 0;

  // The source image: a new qcow2 of `size`, then these qemu-io commands on it.
  void Source(const std::string& size, const std::vector<std::string>& io) {
    QemuImgCreate(img, size);
    QemuIo(img, io);
  }
  // nbdkit on the Unix socket nsock (args: filters, the plugin, parameters), and its target.
  std::unique_ptr<Server> Nbdkit(const std::vector<std::string>& args) { return StartNbdkitUnix(s.dir, nsock, args); }
  nlohmann::json NbdkitTarget() const { return {{"nbd", UnixUri(nsock)}}; }

  // `qcowfs mount --socket SOCK IMG MP`, live (REQUIREd).
  std::unique_ptr<MountGuard> Mount() {
    auto g = std::make_unique<MountGuard>(mp, std::vector<std::string>{"mount", "--socket", sock, img, mp}, sock);
    REQUIRE_MOUNTED(*g);
    return g;
  }

  // `qcowfs mirror SUB --socket SOCK ARGS...`
  CmdResult Mirror(const std::vector<std::string>& args, int timeout_ms = 60000) {
    std::vector<std::string> argv = {Bin(), "mirror", args[0], "--socket", sock};
    argv.insert(argv.end(), args.begin() + 1, args.end());
    return RunTimed(argv, WithTimeout(timeout_ms));
  }
  CmdResult MustMirror(const std::vector<std::string>& args) {
    CmdResult r = Mirror(args);
    INFO(Describe(args, r));
    REQUIRE(r.exit_code == 0);
    return r;
  }
  // `mirror start` of this job JSON is refused: exit 1, one line on stderr containing expect.
  void ExpectRefused(const std::string& json, const std::string& expect) {
    CmdResult res = Mirror({"start", Job(json)});
    INFO(json << "\n" << Describe({"mirror", "start"}, res));
    CHECK(res.exit_code == 1);
    CHECK(CountLines(res.err) == 1);
    CHECK(Contains(res.err, expect));
  }
  // A job file with this JSON.
  std::string Job(const std::string& json) {
    std::string f = s.File("job" + std::to_string(n++) + ".json");
    WriteFileText(f, json);
    return f;
  }
  // A job file: {"id": ID, "mode": MODE, "target": TARGET} plus the keys of extra.
  std::string Job(const std::string& id, const std::string& mode, const nlohmann::json& target,
                  const nlohmann::json& extra = nlohmann::json::object()) {
    nlohmann::json j = extra;
    j["id"] = id;
    j["mode"] = mode;
    j["target"] = target;
    return Job(j.dump());
  }
  nlohmann::json StatusJson(const std::string& id) {
    return nlohmann::json::parse(MustMirror({"status", id, "--json"}).out);
  }
  // "state" or "state: error" of a job.
  std::string JobState(const std::string& id) {
    auto j = StatusJson(id);
    std::string e = j["error"].get<std::string>();
    return j["state"].get<std::string>() + (e.empty() ? "" : ": " + e);
  }
};

// Guest writes through the mount from threads until Stop(): random data at random 512-byte
// aligned offsets in [0, size), lengths 512 B..128 KiB, and every eighth a punched hole.
class GuestWriter {
 public:
  GuestWriter(const std::string& path, uint64_t size, int threads = 1, uint64_t seed = 42) : fd_(path, O_RDWR) {
    REQUIRE(fd_.valid());
    for (int t = 0; t < threads; t++) threads_.emplace_back([this, size, seed, t] { Run(size, seed + t); });
  }
  ~GuestWriter() { Stop(); }
  // Stops the threads; true if no write failed.
  bool Stop() {
    stop_ = true;
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    return failures_.load() == 0;
  }
  int writes() const { return writes_.load(); }
  // Waits until `more` further writes completed (false after timeout_ms).
  bool WaitWrites(int more, int timeout_ms) {
    int target = writes() + more;
    return WaitFor([&] { return writes() >= target || failures_.load() > 0; }, timeout_ms) && failures_.load() == 0;
  }

 private:
  void Run(uint64_t size, uint64_t seed) {
    std::mt19937_64 rng(seed);
    while (!stop_.load()) {
      uint64_t len = 512 * (1 + rng() % 256);
      uint64_t off = (rng() % (size - len)) & ~511ull;
      bool ok;
      if (rng() % 8 == 0) {
        ok = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                         static_cast<off_t>(len)) == 0;
      } else {
        auto b = RandomBytes(rng, len);
        ok = PwriteAll(fd_.get(), b.data(), len, off);
      }
      if (!ok) failures_++;
      writes_++;
    }
  }
  Fd fd_;
  std::atomic<bool> stop_{false};
  std::atomic<int> writes_{0}, failures_{0};
  std::vector<std::thread> threads_;
};

// Milliseconds fn() took.
template <typename Fn>
long long MillisOf(Fn&& fn) {
  auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

// Holes stay holes: [off, off+len) of a finished target holds no data (qcow2: qemu-img
// map; raw: SEEK_DATA finds none there).
inline void CheckNoDataIn(const std::string& target, const std::string& format, uint64_t off, uint64_t len) {
  if (format == "qcow2") {
    auto map = QemuMap(target);
    INFO(MapToString(map));
    CHECK(MapHasNoData(map, off, len));
  } else {
    Fd f(target, O_RDONLY);
    off_t d = ::lseek(f.get(), static_cast<off_t>(off), SEEK_DATA);
    INFO("first data at or after " << off << ": " << d);
    CHECK((d < 0 || d >= static_cast<off_t>(off + len)));
  }
}

}  // namespace qcowfs::testing::mount
