// Real-mount test helpers: MountGuard (mounts the qcowfs daemon and always takes it down
// again), a command runner with a deadline, and the small oracles the mount tests share
// (qemu-img check/compare/map, the qcow2 header's dirty bit, /proc/self/mountinfo).
//
// A hung FUSE daemon blocks every process that touches its mount, the test runner
// included. So MountGuard never waits without a deadline: the unmount and the wait for
// the daemon are bounded, and past them it lazily unmounts, kills THAT daemon PID (never
// by name) and aborts the FUSE connection through fusectl. A watchdog thread does the
// same if a test is stuck in a syscall on the mount for longer than the guard's lifetime
// limit, so that the blocked syscall fails (ENOTCONN) and the test reports instead of
// hanging until the ctest timeout.
#pragma once

#include <doctest/doctest.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::testing::mount {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

// ---------------------------------------------------------------------------------------
// Locating the binary and the tools.

// $QCOWFS_TEST_BIN (set by ctest); standalone, the qcowfs binary next to the test
// binary's directory (build/tests/integ_mount -> build/qcowfs).
inline std::string Bin() {
  static const std::string bin = [] {
    const char* env = getenv("QCOWFS_TEST_BIN");
    if (env != nullptr && *env != '\0') return std::string(env);
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) {
      self[n] = '\0';
      std::filesystem::path dir = std::filesystem::path(self).parent_path();
      for (const auto& cand : {dir / ".." / "qcowfs", dir / "qcowfs", dir / ".." / ".." / "qcowfs",
                               dir / ".." / "build" / "qcowfs"}) {
        if (access(cand.c_str(), X_OK) == 0) return std::filesystem::weakly_canonical(cand).string();
      }
    }
    SkipOrFail("qcowfs binary not found: set QCOWFS_TEST_BIN or build the qcowfs target");
  }();
  return bin;
}

// Everything a real mount needs; skips (or fails under CI=true) without it.
inline void RequireMountTools() {
  for (const char* t : {"qemu-img", "qemu-io", "fusermount3", "sha256sum"}) RequireTool(t);
  if (access("/dev/fuse", R_OK | W_OK) != 0) SkipOrFail("/dev/fuse is not usable");
  (void)Bin();
}

// ---------------------------------------------------------------------------------------
// Commands with a deadline.

inline std::string Join(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

inline std::string ReadFileText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void WriteFileText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// $QCOWFS_TEST_TRANSPORT (auto, legacy or ring; unset: the daemon's default): every
// `qcowfs mount` a test runs gets `--transport T` unless its arguments name a transport
// already, so the whole mount suite can run over FUSE io_uring (ring: the kernel's
// /sys/module/fuse/parameters/enable_uring must be Y; tests/run_all.sh sets it).
inline std::string TestTransport() {
  const char* t = getenv("QCOWFS_TEST_TRANSPORT");
  return t ? std::string(t) : std::string();
}

inline std::vector<std::string> WithTestTransport(std::vector<std::string> argv) {
  std::string t = TestTransport();
  if (t.empty() || argv.size() < 2 || argv[0] != Bin()) return argv;
  const std::string& cmd = argv[1];
  bool mount = cmd == "mount" || (cmd[0] != '-' && cmd != "create" && cmd != "info" && cmd != "status" &&
                                  cmd != "mirror" && argv.size() >= 3);  // IMAGE MP [-o ...]
  if (!mount) return argv;
  for (const auto& a : argv)
    if (a.find("transport") != std::string::npos) return argv;
  argv.insert(argv.end(), {"--transport", t});
  return argv;
}

struct RunOpts {
  int timeout_ms = 60000;
  std::string cwd;
  // Environment changes for the child: value std::nullopt unsets the variable.
  std::map<std::string, std::optional<std::string>> env;
};

constexpr int kTimedOut = 124;

inline RunOpts WithTimeout(int ms) {
  RunOpts o;
  o.timeout_ms = ms;
  return o;
}

// $QCOWFS_TEST_CACHE (e.g. "none"): every `qcowfs mount` the tests run gets
// `--cache VALUE`, so the same mount tests run in both cache modes (tests/run_all.sh runs
// integ_mount and integ_stress again with QCOWFS_TEST_CACHE=none). A command that already
// names a cache mode is left alone.
inline std::string TestCacheMode() {
  const char* env = getenv("QCOWFS_TEST_CACHE");
  return env != nullptr ? std::string(env) : std::string();
}

inline std::vector<std::string> WithTestCache(std::vector<std::string> argv) {
  const std::string mode = TestCacheMode();
  if (mode.empty()) return argv;
  auto it = std::find(argv.begin(), argv.end(), "mount");
  if (it == argv.end() || it == argv.begin()) return argv;
  const std::string& prog = *(it - 1);
  if (prog.size() < 6 || prog.compare(prog.size() - 6, 6, "qcowfs") != 0) return argv;
  for (const auto& a : argv)
    if (a == "--cache" || a.rfind("--cache=", 0) == 0 || a.find("cache=") != std::string::npos) return argv;
  argv.insert(it + 1, {"--cache", mode});
  return argv;
}

// Runs argv (PATH lookup), stdout/stderr into temporary files (so a daemon that keeps
// them open cannot block us), waits at most opts.timeout_ms; on timeout kills that child
// with SIGKILL and returns kTimedOut with a note in err. A `qcowfs mount` gets the test
// cache mode (WithTestCache) and transport (WithTestTransport).
inline CmdResult RunTimed(const std::vector<std::string>& argv_in, const RunOpts& opts = {}) {
  const std::vector<std::string> argv = WithTestTransport(WithTestCache(argv_in));
  CmdResult r{127, "", ""};
  char out_tmpl[] = "/tmp/qcowfs-mt-out.XXXXXX";
  char err_tmpl[] = "/tmp/qcowfs-mt-err.XXXXXX";
  int out_fd = mkstemp(out_tmpl);
  int err_fd = mkstemp(err_tmpl);
  if (out_fd < 0 || err_fd < 0) {
    r.err = "mkstemp failed";
    return r;
  }
  unlink(out_tmpl);
  unlink(err_tmpl);
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  if (pid == 0) {
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    dup2(out_fd, STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    for (const auto& [k, v] : opts.env) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
    if (!opts.cwd.empty() && chdir(opts.cwd.c_str()) < 0) _exit(127);
    execvp(cargv[0], cargv.data());
    _exit(127);
  }
  if (pid < 0) {
    r.err = std::string("fork: ") + strerror(errno);
    close(out_fd);
    close(err_fd);
    return r;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(opts.timeout_ms);
  int status = 0;
  bool timed_out = false;
  for (;;) {
    pid_t w = waitpid(pid, &status, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  auto slurp = [](int fd) {
    std::string s;
    char buf[8192];
    ssize_t n;
    off_t off = 0;
    while ((n = pread(fd, buf, sizeof(buf), off)) > 0) {
      s.append(buf, static_cast<size_t>(n));
      off += n;
    }
    close(fd);
    return s;
  };
  r.out = slurp(out_fd);
  r.err = slurp(err_fd);
  if (timed_out) {
    r.exit_code = kTimedOut;
    r.err += "\n[test: killed after " + std::to_string(opts.timeout_ms) + " ms: " + Join(argv) + "]";
  } else if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.exit_code = 128 + WTERMSIG(status);
  }
  return r;
}

inline std::string Describe(const std::vector<std::string>& argv, const CmdResult& r) {
  return "command: " + Join(argv) + "\nexit " + std::to_string(r.exit_code) + "\nstdout: " + r.out +
         "\nstderr: " + r.err;
}

// Runs argv and REQUIREs exit 0.
inline CmdResult Must(const std::vector<std::string>& argv, const RunOpts& opts = {}) {
  CmdResult r = RunTimed(argv, opts);
  INFO(Describe(argv, r));
  REQUIRE(r.exit_code == 0);
  return r;
}

inline int CountLines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  if (!s.empty() && s.back() != '\n') n++;
  return n;
}

inline bool Contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

inline std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---------------------------------------------------------------------------------------
// Processes and mounts.

// Makes this test process the subreaper of its descendants, so a daemonized qcowfs (whose
// parent, the `qcowfs mount` command, exits) becomes our child and its exit status can be
// collected with waitpid().
inline void BecomeSubreaper() {
  static bool done = [] {
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    return true;
  }();
  (void)done;
}

// Exit state of a process the test did not necessarily start.
struct ExitState {
  bool exited = false;
  int code = -1;  // exit status (128+signal) when it was our child and we reaped it; else -1
};

// Polls once. Reaps pid if it is our child (subreaper); otherwise looks at /proc (a zombie
// somebody else has not reaped yet counts as exited).
inline ExitState PollExit(pid_t pid) {
  ExitState s;
  int status = 0;
  pid_t w = waitpid(pid, &status, WNOHANG);
  if (w == pid) {
    s.exited = true;
    s.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return s;
  }
  if (w == 0) return s;  // our child, still running
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) {
    s.exited = true;
    return s;
  }
  std::string line;
  std::getline(in, line);
  auto rp = line.rfind(')');
  if (rp != std::string::npos && rp + 2 < line.size() && (line[rp + 2] == 'Z' || line[rp + 2] == 'X'))
    s.exited = true;
  return s;
}

inline ExitState WaitExit(pid_t pid, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    ExitState s = PollExit(pid);
    if (s.exited || std::chrono::steady_clock::now() > deadline) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

inline std::string RealPath(const std::string& p) {
  char buf[PATH_MAX];
  if (realpath(p.c_str(), buf) != nullptr) return buf;
  return p;
}

// mountinfo escapes space, tab, newline and backslash as \ooo.
inline std::string UnescapeMountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

struct MountEntry {
  std::string mountpoint;
  std::string fstype;
  unsigned minor = 0;  // the FUSE connection number under /sys/fs/fuse/connections
};

// FUSE mounts at the absolute mountpoint (the last one if stacked).
inline std::optional<MountEntry> FindFuseMount(const std::string& abs_mountpoint) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  std::optional<MountEntry> found;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, devno, root, mp;
    ls >> id >> parent >> devno >> root >> mp;
    std::string tok;
    while (ls >> tok && tok != "-") {
    }
    std::string fstype;
    ls >> fstype;
    if (UnescapeMountinfo(mp) != abs_mountpoint || fstype.rfind("fuse", 0) != 0) continue;
    MountEntry e;
    e.mountpoint = abs_mountpoint;
    e.fstype = fstype;
    auto colon = devno.find(':');
    if (colon != std::string::npos) e.minor = static_cast<unsigned>(std::stoul(devno.substr(colon + 1)));
    found = e;
  }
  return found;
}

inline bool IsMounted(const std::string& mountpoint) { return FindFuseMount(RealPath(mountpoint)).has_value(); }

// Writes "1" to /sys/fs/fuse/connections/N/abort, mounting fusectl there first if needed.
inline bool AbortFuseConnection(unsigned minor) {
  const std::string dir = "/sys/fs/fuse/connections";
  std::string abort_file = dir + "/" + std::to_string(minor) + "/abort";
  if (access(abort_file.c_str(), W_OK) != 0) {
    ::mount("fusectl", dir.c_str(), "fusectl", 0, nullptr);  // may already be mounted
  }
  int fd = ::open(abort_file.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::write(fd, "1", 1) == 1;
  ::close(fd);
  return ok;
}

// Reads a big-endian field of the qcow2 header.
inline uint64_t ReadBe(const std::string& path, off_t off, int bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ~0ull;
  unsigned char b[8] = {};
  ssize_t n = ::pread(fd, b, static_cast<size_t>(bytes), off);
  ::close(fd);
  if (n != bytes) return ~0ull;
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v = (v << 8) | b[i];
  return v;
}

// qcow2 v3 incompatible_features (header offset 72): bit 0 dirty, bit 1 corrupt.
inline uint64_t IncompatibleFeatures(const std::string& img) {
  if (ReadBe(img, 4, 4) < 3) return 0;  // version 2 has no feature bits
  return ReadBe(img, 72, 8);
}

// Polls until pred() or timeout.
template <typename Pred>
bool WaitFor(Pred pred, int timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// MountGuard.

class MountGuard {
 public:
  // Runs `qcowfs ARGS...` (ARGS begins with "mount", or is IMAGE MOUNTPOINT -o ...), which
  // must exit 0 with the mount live, then finds the daemon PID with `qcowfs status --json`
  // (through `socket` if given, else the mountpoint). `mountpoint` is what gets unmounted.
  // The watchdog aborts the mount if the guard lives longer than max_life_ms.
  MountGuard(std::string mountpoint, std::vector<std::string> args, std::string socket = "",
             RunOpts opts = {}, int max_life_ms = 120000)
      : mountpoint_(RealPath(mountpoint)), socket_(std::move(socket)), opts_(std::move(opts)) {
    BecomeSubreaper();
    std::vector<std::string> argv = {Bin()};
    argv.insert(argv.end(), args.begin(), args.end());
    RunOpts mopts = opts_;
    mopts.timeout_ms = 30000;
    result_ = RunTimed(argv, mopts);
    describe_ = Describe(argv, result_);
    if (auto m = FindFuseMount(mountpoint_)) conn_ = m->minor;
    if (result_.exit_code != 0) {
      error_ = "mount command failed: " + describe_;
      return;
    }
    if (!conn_) {
      error_ = "mount command exited 0 but " + mountpoint_ + " is not a FUSE mount: " + describe_;
      return;
    }
    CmdResult st = Status(true);
    try {
      auto j = nlohmann::json::parse(st.out);
      pid_ = j.at("pid").get<pid_t>();
    } catch (const std::exception& e) {
      error_ = std::string("cannot get the daemon pid from status --json: ") + e.what() + "\n" +
               Describe({"status"}, st);
      return;
    }
    if (pid_ <= 0 || PollExit(pid_).exited) {
      error_ = "status reported pid " + std::to_string(pid_) + ", which is not running";
      return;
    }
    watchdog_ = std::thread([this, max_life_ms] { Watchdog(max_life_ms); });
  }

  ~MountGuard() { Teardown(); }

  MountGuard(const MountGuard&) = delete;
  MountGuard& operator=(const MountGuard&) = delete;

  // The mount command exited 0, the mount is live and the daemon PID is known.
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  const CmdResult& mount_result() const { return result_; }
  pid_t pid() const { return pid_; }
  const std::string& mountpoint() const { return mountpoint_; }

  // `qcowfs status [--json] (MP | --socket S)`.
  CmdResult Status(bool json) const {
    std::vector<std::string> argv = {Bin(), "status"};
    if (json) argv.push_back("--json");
    if (socket_.empty()) argv.push_back(mountpoint_);
    else argv.insert(argv.end(), {"--socket", socket_});
    RunOpts o = opts_;
    o.timeout_ms = 15000;
    return RunTimed(argv, o);
  }

  nlohmann::json StatusJson() const {
    CmdResult r = Status(true);
    INFO(Describe({"qcowfs", "status", "--json"}, r));
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.out);
  }

  // Clean unmount: `fusermount3 -u MP`, then waits up to 10 s for the daemon to exit.
  // Returns "" on success (daemon gone, exit status 0 when we could collect it, mount
  // gone), else what went wrong. Falls back to the forced teardown on failure.
  std::string Unmount() {
    if (watchdog_fired_) return "the watchdog aborted the mount (a request hung)";
    if (!ok() || done_) return done_ ? "" : error_;
    CmdResult r = RunTimed({"fusermount3", "-u", mountpoint_}, WithTimeout(15000));
    std::string why;
    if (r.exit_code != 0) why = "fusermount3 -u failed: " + Describe({"fusermount3", "-u", mountpoint_}, r);
    why += WaitDaemonGone("after fusermount3 -u");
    return why;
  }

  // Sends sig to the daemon and waits as Unmount() does.
  std::string SignalAndWait(int sig) {
    if (!ok() || done_) return done_ ? "already down" : error_;
    if (kill(pid_, sig) != 0) return std::string("kill: ") + strerror(errno);
    return WaitDaemonGone(std::string("after signal ") + strsignal(sig));
  }

  // Exit status of the daemon if collected (-1 if unknown).
  int exit_code() const { return exit_code_; }

 private:
  std::string WaitDaemonGone(const std::string& when) {
    std::string why;
    ExitState s = WaitExit(pid_, 10000);
    if (!s.exited) {
      why += "daemon pid " + std::to_string(pid_) + " still running 10 s " + when + "; ";
      ForceTeardown();
      return why;
    }
    exit_code_ = s.code;
    StopWatchdog();
    done_ = true;
    if (s.code != -1 && s.code != 0) why += "daemon exited with status " + std::to_string(s.code) + " " + when + "; ";
    if (!WaitFor([&] { return !IsMounted(mountpoint_); }, 3000)) {
      why += "mount still present after the daemon exited " + when + "; ";
      ForceTeardown();
    }
    return why;
  }

  // The destructor's unmount. Problems are test failures (FAIL_CHECK does not throw, so
  // this is safe during unwinding too).
  void Teardown() {
    StopWatchdog();  // joins a watchdog that may be tearing down right now
    if (watchdog_fired_) {
      FAIL_CHECK("MountGuard watchdog: " << mountpoint_ << " outlived its time limit and was aborted");
    }
    if (done_) return;
    if (ok()) {
      std::string why = Unmount();
      if (!why.empty()) FAIL_CHECK("MountGuard(" << mountpoint_ << ") teardown: " << why);
    } else {
      ForceTeardown();
    }
  }

  // Lazy unmount, kill -9 of the daemon PID, abort of the FUSE connection.
  void ForceTeardown() {
    std::lock_guard<std::mutex> l(force_mu_);
    if (conn_ || IsMounted(mountpoint_)) {
      if (!conn_) conn_ = FindFuseMount(mountpoint_)->minor;
      AbortFuseConnection(*conn_);
    }
    if (pid_ > 0 && !PollExit(pid_).exited) {
      kill(pid_, SIGKILL);
      WaitExit(pid_, 5000);
    }
    if (IsMounted(mountpoint_)) RunTimed({"fusermount3", "-u", "-z", mountpoint_}, WithTimeout(10000));
    if (IsMounted(mountpoint_)) ::umount2(mountpoint_.c_str(), MNT_DETACH);
    done_ = true;
  }

  void Watchdog(int max_life_ms) {
    std::unique_lock<std::mutex> l(wd_mu_);
    if (wd_cv_.wait_for(l, std::chrono::milliseconds(max_life_ms), [this] { return wd_stop_; })) return;
    fprintf(stderr, "MountGuard watchdog: %s mounted for more than %d ms, aborting it\n", mountpoint_.c_str(),
            max_life_ms);
    watchdog_fired_ = true;
    l.unlock();
    ForceTeardown();
  }

  void StopWatchdog() {
    {
      std::lock_guard<std::mutex> l(wd_mu_);
      wd_stop_ = true;
    }
    wd_cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
  }

  std::string mountpoint_;
  std::string socket_;
  RunOpts opts_;
  CmdResult result_{127, "", ""};
  std::string describe_;
  std::string error_;
  std::optional<unsigned> conn_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
  std::atomic<bool> done_{false};
  std::atomic<bool> watchdog_fired_{false};
  std::mutex force_mu_;
  std::mutex wd_mu_;
  std::condition_variable wd_cv_;
  bool wd_stop_ = false;
  std::thread watchdog_;
};

#define REQUIRE_MOUNTED(g) \
  do {                     \
    INFO((g).error());     \
    REQUIRE((g).ok());     \
  } while (0)

// Unmounts with fusermount3 -u; the daemon must exit with status 0 (it is our child as
// the subreaper, so the status is known) and the mount must be gone.
#define CHECK_UNMOUNTS(g)               \
  do {                                  \
    std::string why_ = (g).Unmount();   \
    INFO(why_);                         \
    CHECK(why_.empty());                \
    CHECK((g).exit_code() == 0);        \
  } while (0)

// ---------------------------------------------------------------------------------------
// File I/O on the mounted file.

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const std::string& path, int flags, mode_t mode = 0644) : fd_(::open(path.c_str(), flags | O_CLOEXEC, mode)) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Close() { return ::close(std::exchange(fd_, -1)); }

 private:
  int fd_;
};

// Full pwrite/pread (loops over short transfers); false on error.
inline bool PwriteAll(int fd, const void* buf, size_t len, uint64_t off) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return true;
}

inline bool PreadAll(int fd, void* buf, size_t len, uint64_t off) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd, p, len, static_cast<off_t>(off));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return true;
}

// The most FUSE requests of the mount at mountpoint that the kernel had outstanding at once
// (/sys/fs/fuse/connections/N/waiting, sampled) while `writers` threads write 1 MiB blocks
// to the mounted file, each to its own region (opened before the sampling starts, closed
// after it ends), until more than one was seen or about 3 s passed. Without FOPEN_PARALLEL_DIRECT_WRITES on the open reply the kernel runs direct
// writes to one file one at a time under its inode lock: then this stays 1. 0: the
// counter could not be read (*why says why).
inline unsigned MaxConcurrentWrites(const std::string& mountpoint, int writers, std::string* why) {
  auto m = FindFuseMount(RealPath(mountpoint));
  if (!m) {
    *why = "not mounted: " + mountpoint;
    return 0;
  }
  const std::string dir = "/sys/fs/fuse/connections";
  std::string waiting = dir + "/" + std::to_string(m->minor) + "/waiting";
  if (access(waiting.c_str(), R_OK) != 0) ::mount("fusectl", dir.c_str(), "fusectl", 0, nullptr);
  if (access(waiting.c_str(), R_OK) != 0) {
    *why = "cannot read " + waiting + ": " + strerror(errno);
    return 0;
  }
  // Every writer opens its file first: only writes may be outstanding while sampling.
  std::atomic<bool> go{false}, stop{false};
  std::atomic<int> failed{0}, opened{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < writers; t++)
    ts.emplace_back([&, t] {
      Fd fd(mountpoint, O_RDWR);
      opened++;
      while (!go.load()) std::this_thread::yield();
      std::vector<char> buf(MiB, static_cast<char>('0' + t));
      for (uint64_t i = 0; fd.valid() && !stop.load(); i++)
        if (!PwriteAll(fd.get(), buf.data(), buf.size(), (uint64_t(t) * 8 + i % 8) * MiB)) {
          failed++;
          break;
        }
    });
  while (opened.load() < writers) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));  // the OPEN replies are in
  go = true;
  unsigned most = 0;
  auto end = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (most < 2 && std::chrono::steady_clock::now() < end) {
    char b[32] = {};
    int wfd = ::open(waiting.c_str(), O_RDONLY | O_CLOEXEC);  // not seekable: one open per sample
    ssize_t n = wfd >= 0 ? ::read(wfd, b, sizeof(b) - 1) : -1;
    if (wfd >= 0) ::close(wfd);
    if (n > 0) most = std::max(most, static_cast<unsigned>(std::strtoul(b, nullptr, 10)));
  }
  stop = true;
  for (auto& t : ts) t.join();
  if (failed.load()) *why = "a write to the mounted file failed";
  return most;
}

inline std::vector<char> ReadRange(const std::string& path, uint64_t off, size_t len) {
  std::vector<char> buf(len);
  Fd fd(path, O_RDONLY);
  REQUIRE_MESSAGE(fd.valid(), path << ": " << strerror(errno));
  REQUIRE_MESSAGE(PreadAll(fd.get(), buf.data(), len, off), path << " pread @" << off << ": " << strerror(errno));
  return buf;
}

inline bool AllBytes(const std::vector<char>& v, char c) {
  return std::all_of(v.begin(), v.end(), [c](char x) { return x == c; });
}

// Index of the first byte that differs, or -1.
inline long long FirstDiff(const char* a, const char* b, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (a[i] != b[i]) return static_cast<long long>(i);
  return -1;
}

inline std::vector<char> RandomBytes(std::mt19937_64& rng, size_t len) {
  std::vector<char> v(len);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t x = rng();
    std::memcpy(v.data() + i, &x, 8);
  }
  for (; i < len; i++) v[i] = static_cast<char>(rng());
  return v;
}

// Seed for the random tests: $QCOWFS_TEST_SEED or a fixed default (printed on failure).
inline uint64_t TestSeed(uint64_t dflt) {
  const char* s = getenv("QCOWFS_TEST_SEED");
  return s ? std::stoull(s) : dflt;
}

inline uint64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : ~0ull;
}

inline uint64_t AllocatedBytesOf(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : ~0ull;
}

// ---------------------------------------------------------------------------------------
// qemu as the oracle.

inline void QemuImgCreate(const std::string& img, const std::string& size, const std::string& opts = "",
                          const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {"qemu-img", "create", "-q", "-f", "qcow2"};
  if (!opts.empty()) argv.insert(argv.end(), {"-o", opts});
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.insert(argv.end(), {img, size});
  Must(argv);
}

// qemu-io -c CMD... on img (format qcow2 unless fmt given).
inline void QemuIo(const std::string& img, const std::vector<std::string>& cmds, const std::string& fmt = "qcow2") {
  std::vector<std::string> argv = {"qemu-io", "-f", fmt};
  for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
  argv.push_back(img);
  CmdResult r = Must(argv);
  INFO(r.out);
  CHECK_FALSE(Contains(r.out + r.err, "failed"));
}

// Creates a raw file of `size` bytes (sparse).
inline void MakeRaw(const std::string& path, uint64_t size) {
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd.valid());
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(size)) == 0);
}

inline nlohmann::json QemuInfo(const std::string& img) {
  CmdResult r = Must({"qemu-img", "info", "--output=json", img});
  return nlohmann::json::parse(r.out);
}

inline uint64_t VirtualSize(const std::string& img) { return QemuInfo(img).at("virtual-size").get<uint64_t>(); }

// qemu-img check exits 0 (no corruption, no leaks) and the image is not marked dirty or
// corrupt in its header.
inline void CheckClean(const std::string& img) {
  std::vector<std::string> argv = {"qemu-img", "check", img};
  CmdResult r = RunTimed(argv);
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 0);
  uint64_t inc = IncompatibleFeatures(img);
  INFO("incompatible_features = " << inc);
  CHECK((inc & 1) == 0);  // dirty
  CHECK((inc & 2) == 0);  // corrupt
}

// qemu-img compare img(qcow2) ref(raw) reports identical content.
inline void CheckSameContent(const std::string& img, const std::string& ref, const std::string& ref_fmt = "raw") {
  std::vector<std::string> argv = {"qemu-img", "compare", "-f", "qcow2", "-F", ref_fmt, img, ref};
  CmdResult r = RunTimed(argv);
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 0);
}

struct MapExtent {
  uint64_t start, length;
  bool data, zero;
  std::optional<uint64_t> offset;  // host offset
};

inline std::vector<MapExtent> QemuMap(const std::string& img) {
  CmdResult r = Must({"qemu-img", "map", "--output=json", img});
  std::vector<MapExtent> out;
  for (const auto& e : nlohmann::json::parse(r.out)) {
    MapExtent m{e.at("start").get<uint64_t>(), e.at("length").get<uint64_t>(), e.at("data").get<bool>(),
                e.at("zero").get<bool>(), std::nullopt};
    if (e.contains("offset")) m.offset = e.at("offset").get<uint64_t>();
    out.push_back(m);
  }
  return out;
}

// True if no extent overlapping [off, off+len) has data.
inline bool MapHasNoData(const std::vector<MapExtent>& map, uint64_t off, uint64_t len) {
  for (const auto& e : map)
    if (e.start < off + len && off < e.start + e.length && e.data) return false;
  return true;
}

// True if every byte of [off, off+len) is covered by data extents.
inline bool MapAllData(const std::vector<MapExtent>& map, uint64_t off, uint64_t len) {
  uint64_t covered = 0;
  for (const auto& e : map) {
    if (!e.data) continue;
    uint64_t s = std::max(e.start, off), t = std::min(e.start + e.length, off + len);
    if (s < t) covered += t - s;
  }
  return covered == len;
}

inline std::string MapToString(const std::vector<MapExtent>& map) {
  std::ostringstream os;
  for (const auto& e : map)
    os << "[" << e.start << "+" << e.length << (e.data ? " data" : "") << (e.zero ? " zero" : "")
       << (e.offset ? " @" + std::to_string(*e.offset) : "") << "] ";
  return os.str();
}

// Host offset backing guest offset off (data extents only).
inline std::optional<uint64_t> HostOffset(const std::vector<MapExtent>& map, uint64_t off) {
  for (const auto& e : map)
    if (e.data && e.offset && e.start <= off && off < e.start + e.length) return *e.offset + (off - e.start);
  return std::nullopt;
}

// A temporary directory with the mountpoint file/dir ready, paths canonical.
struct Scratch {
  TempDir dir{"qcowfs-mount"};
  std::string root = RealPath(dir.path());
  std::string File(const std::string& name) const { return root + "/" + name; }
  // An empty regular file to mount the image on.
  std::string FileMountpoint(const std::string& name = "mp") const {
    std::string p = File(name);
    Fd fd(p, O_RDWR | O_CREAT, 0644);
    REQUIRE(fd.valid());
    return p;
  }
  std::string DirMountpoint(const std::string& name = "mnt") const {
    std::string p = File(name);
    REQUIRE(::mkdir(p.c_str(), 0755) == 0);
    return p;
  }
};

}  // namespace qcowfs::testing::mount
