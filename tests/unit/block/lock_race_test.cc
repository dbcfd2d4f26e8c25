// Image locks under races: two openers that run at the same time never both get an image
// read-write, against our own opens and against QEMU's (qemu-io).
//
// The deterministic tests interpose fcntl(2) in this binary: at the k-th lock call
// (F_OFD_SETLK / F_OFD_GETLK) of one open, a whole second open (ours, or qemu-io taking
// the image) runs before that call goes on, for every k. That covers every point at which
// the other opener can slip in, so the old order (test every byte, then take them) fails
// at the first take, and the threaded test is only a second, statistical, check.
#include <dlfcn.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <cerrno>
#include <cstdarg>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "block/raw_file_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace {

// --- fcntl interposition -----------------------------------------------------

using FcntlFn = int (*)(int, int, ...);

std::atomic<bool> g_armed{false};  // counting the lock calls of g_hook_thread
bool g_in_hook = false;            // the hook runs: its own calls are not counted
int g_lock_calls = 0;              // lock calls of the open under test so far
int g_hook_at = -1;                // run g_hook before this lock call (0-based)
std::thread::id g_hook_thread;
std::function<void()> g_hook;

FcntlFn Real(const char* name) {
  static FcntlFn fcntl_fn = reinterpret_cast<FcntlFn>(dlsym(RTLD_NEXT, "fcntl"));
  static FcntlFn fcntl64_fn = reinterpret_cast<FcntlFn>(dlsym(RTLD_NEXT, "fcntl64"));
  FcntlFn f = name[5] == '6' ? fcntl64_fn : fcntl_fn;
  return f ? f : (fcntl64_fn ? fcntl64_fn : fcntl_fn);
}

void MaybeRunHook(int cmd) {
  if (!g_armed.load() || g_in_hook || std::this_thread::get_id() != g_hook_thread) return;
  if (cmd != F_OFD_SETLK && cmd != F_OFD_GETLK) return;
  if (g_lock_calls++ != g_hook_at) return;
  g_in_hook = true;  // the hook's own opens run unhooked and uncounted
  g_hook();
  g_in_hook = false;
}

int Forward(const char* name, int fd, int cmd, va_list ap) {
  void* arg = va_arg(ap, void*);  // every fcntl argument fits (int or pointer), as in glibc
  MaybeRunHook(cmd);
  return Real(name)(fd, cmd, arg);
}

}  // namespace

extern "C" int fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  int r = Forward("fcntl", fd, cmd, ap);
  va_end(ap);
  return r;
}

extern "C" int fcntl64(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  int r = Forward("fcntl64", fd, cmd, ap);
  va_end(ap);
  return r;
}

namespace qcowfs::block {
namespace {

using qcowfs::testing::RequireTool;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

using OpenResult = Result<std::unique_ptr<RawFileDevice>>;

// Runs open() with hook() slipped in before its k-th lock call; returns the number of lock
// calls open() made (the hook ran iff k is below it).
int OpenWithHookAt(int k, const std::function<void()>& hook, const std::function<void()>& open) {
  g_hook = hook;
  g_hook_at = k;
  g_hook_thread = std::this_thread::get_id();
  g_lock_calls = 0;
  g_armed.store(true);
  open();
  g_armed.store(false);
  int calls = g_lock_calls;
  if (k >= calls) hook();  // never slipped in: the other opener comes after
  return calls;
}

std::string MakeFile(const TempDir& dir) {
  std::string path = dir.File("img");
  std::vector<char> data(4096, 0);
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  close(fd);
  return path;
}

TEST_CASE("image locks: a second exclusive open slipped in at any lock call never also succeeds") {
  TempDir dir;
  const std::string path = MakeFile(dir);
  int k = 0;
  for (;; k++) {
    std::unique_ptr<OpenResult> a, b;
    int calls = OpenWithHookAt(
        k, [&] { b = std::make_unique<OpenResult>(RawFileDevice::Open(path, false, LockMode::kExclusive)); },
        [&] { a = std::make_unique<OpenResult>(RawFileDevice::Open(path, false, LockMode::kExclusive)); });
    INFO("second open slipped in before lock call " << k << " of " << calls);
    CHECK_MESSAGE(!(a->ok() && b->ok()), "both exclusive opens succeeded");
    CHECK_MESSAGE((a->ok() || b->ok()), "neither open succeeded, though one ran after the other");
    for (auto* r : {a.get(), b.get()}) {
      if (r->ok()) continue;
      CHECK(r->status().err() == EAGAIN);
      CHECK(r->status().message().find(path + ": failed to get") == 0);
      CHECK(r->status().message().find("lock: is another process using the image?") != std::string::npos);
    }
    if (k >= calls) break;
  }
  CHECK(k >= 5);  // the hook went through every lock call of an exclusive open

  // The loser released what it took: once the winner closes, the image is free.
  auto again = RawFileDevice::Open(path, false, LockMode::kExclusive);
  CHECK_MESSAGE(again.ok(), again.status().ToString());
}

TEST_CASE("image locks: a reader slipped in at any lock call of a writer never coexists with it") {
  TempDir dir;
  const std::string path = MakeFile(dir);
  for (bool writer_first : {true, false}) {
    int k = 0;
    for (;; k++) {
      std::unique_ptr<OpenResult> w, r;
      auto open_w = [&] { w = std::make_unique<OpenResult>(RawFileDevice::Open(path, false, LockMode::kExclusive)); };
      auto open_r = [&] { r = std::make_unique<OpenResult>(RawFileDevice::Open(path, true, LockMode::kShared)); };
      int calls = writer_first ? OpenWithHookAt(k, open_r, open_w) : OpenWithHookAt(k, open_w, open_r);
      INFO((writer_first ? "reader" : "writer") << " slipped in before lock call " << k << " of " << calls);
      CHECK_MESSAGE(!(w->ok() && r->ok()), "a writer and a reader that refuses writers both opened");
      if (k >= calls) break;
    }
  }
}

TEST_CASE("image locks: two threads opening exclusively at once, 500 rounds") {
  TempDir dir;
  const std::string path = MakeFile(dir);
  constexpr int kRounds = 500;
  std::barrier sync(2);
  std::vector<int> won(2 * kRounds, 0);
  auto worker = [&](int id) {
    for (int i = 0; i < kRounds; i++) {
      sync.arrive_and_wait();
      auto r = RawFileDevice::Open(path, false, LockMode::kExclusive);
      won[2 * i + id] = r.ok() ? 1 : 0;
      sync.arrive_and_wait();  // both results are in before either closes
    }
  };
  std::thread t0(worker, 0), t1(worker, 1);
  t0.join();
  t1.join();
  int both = 0;
  for (int i = 0; i < kRounds; i++) both += won[2 * i] && won[2 * i + 1];
  CHECK_MESSAGE(both == 0, both << " of " << kRounds << " rounds gave the image to both openers");
}

// qemu-io holding img (a write, then a long sleep) until Stop().
class QemuIoHolder {
 public:
  // Starts qemu-io and waits until it either wrote (it holds the image) or exited.
  void Start(const std::string& img) {
    int p[2];
    REQUIRE(pipe2(p, O_CLOEXEC) == 0);
    fflush(stdout);
    fflush(stderr);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      int devnull = open("/dev/null", O_RDONLY);
      dup2(devnull, 0);
      dup2(p[1], 1);
      dup2(p[1], 2);
      // Line-buffered, so that "wrote" arrives before the sleep.
      execlp("stdbuf", "stdbuf", "-oL", "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 512", "-c", "sleep 600000", img.c_str(),
             static_cast<char*>(nullptr));
      _exit(127);
    }
    close(p[1]);
    // Until "wrote" appears or the pipe closes (qemu-io exited, e.g. on a lock error).
    char buf[4096];
    for (;;) {
      ssize_t n = read(p[0], buf, sizeof(buf));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      output_.append(buf, static_cast<size_t>(n));
      if (output_.find("wrote 512/512") != std::string::npos) break;
    }
    close(p[0]);
    holds_ = output_.find("wrote 512/512") != std::string::npos;
  }
  void Stop() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }
  ~QemuIoHolder() { Stop(); }
  bool holds() const { return holds_; }
  const std::string& output() const { return output_; }

 private:
  pid_t pid_ = -1;
  bool holds_ = false;
  std::string output_;
};

TEST_CASE("image locks: qemu-io slipped in at any lock call never writes while we hold the image") {
  RequireTool("qemu-io");
  RequireTool("stdbuf");
  TempDir dir;
  const std::string path = MakeFile(dir);
  int k = 0;
  for (;; k++) {
    std::unique_ptr<OpenResult> a;
    QemuIoHolder q;
    int calls = OpenWithHookAt(
        k, [&] { q.Start(path); },
        [&] { a = std::make_unique<OpenResult>(RawFileDevice::Open(path, false, LockMode::kExclusive)); });
    INFO("qemu-io slipped in before lock call " << k << " of " << calls << "; qemu-io said: " << q.output());
    CHECK_MESSAGE(!(a->ok() && q.holds()), "qemu-io wrote to the image we hold");
    CHECK((a->ok() || q.holds()));
    if (!a->ok()) CHECK(a->status().err() == EAGAIN);
    q.Stop();
    if (k >= calls) break;
  }
}

TEST_CASE("image locks: qemu-io refused while we hold the image; our opens refused while qemu-io does") {
  RequireTool("qemu-io");
  RequireTool("stdbuf");
  TempDir dir;
  const std::string path = MakeFile(dir);
  {
    auto held = RawFileDevice::Open(path, false, LockMode::kExclusive);
    REQUIRE(held.ok());
    auto w = RunCommand({"qemu-io", "-f", "raw", "-c", "write 0 512", path});
    CHECK(w.exit_code != 0);
    CHECK_MESSAGE(w.err.find("Failed to get \"write\" lock") != std::string::npos, w.err);
  }
  QemuIoHolder q;
  q.Start(path);
  REQUIRE_MESSAGE(q.holds(), q.output());
  auto w = RawFileDevice::Open(path, false, LockMode::kExclusive);
  REQUIRE_FALSE(w.ok());
  CHECK(w.status().err() == EAGAIN);
  // qemu-io holds "write" (byte 101) and, on a raw file, shares it.
  CHECK(w.status().message() == path + ": failed to get shared \"write\" lock: is another process using the image?");
  auto r = RawFileDevice::Open(path, true, LockMode::kShared);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().message() == path + ": failed to get shared \"write\" lock: is another process using the image?");
  q.Stop();
  CHECK(RawFileDevice::Open(path, false, LockMode::kExclusive).ok());
}

}  // namespace
}  // namespace qcowfs::block
