#include "fuse/kernel_io.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <semaphore.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <unordered_set>

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

#include "util/log.h"

namespace qcowfs::fuse {
namespace {

// --- FUSE_DIRECT_IO_ALLOW_MMAP in the INIT reply ------------------------------

// Protocol 7.39 (kernel 6.6; Debian 12's <linux/fuse.h> is 7.38 and lacks it):
// FUSE_DIRECT_IO_ALLOW_MMAP is init flag bit 36. Flags 32..63 travel in the
// 32-bit flags2 field of fuse_init_in / fuse_init_out (bit 36 = flags2 bit 4),
// and each side reads flags2 only when the other set FUSE_INIT_EXT (bit 30 of
// flags). With it, the kernel lets a FOPEN_DIRECT_IO file be mmap'ed
// MAP_SHARED (page cache for the mappings only, kept coherent by the kernel:
// kernel_io.h). Without it such an mmap fails with ENODEV. libfuse 3.14 has no
// capability for it.
constexpr uint32_t kInitExt = 1u << 30;                    // FUSE_INIT_EXT (flags)
constexpr uint32_t kDirectIoAllowMmap2 = 1u << (36 - 32);  // FUSE_DIRECT_IO_ALLOW_MMAP (flags2)

std::atomic<bool> g_init_pending{false};  // an INIT request is unanswered
std::atomic<uint64_t> g_init_unique{0};   // its unique id
std::atomic<bool> g_mmap_offered{false};  // the kernel's INIT offered the flag

void NoteInit(const void* buf, ssize_t n) {
  const auto* in = static_cast<const fuse_in_header*>(buf);
  // flags2 exists from 7.36 on (fuse_init_in grew then); a shorter request has none.
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header) + offsetof(fuse_init_in, flags2) +
                               sizeof(uint32_t))) {
    g_mmap_offered.store(false);
  } else {
    fuse_init_in init{};
    std::memcpy(&init, static_cast<const char*>(buf) + sizeof(fuse_in_header),
                offsetof(fuse_init_in, flags2) + sizeof(uint32_t));
    g_mmap_offered.store((init.flags & kInitExt) && (init.flags2 & kDirectIoAllowMmap2));
  }
  g_init_unique.store(in->unique, std::memory_order_relaxed);
  g_init_pending.store(true, std::memory_order_release);
}

// Sets the flag in a successful INIT reply when the kernel offered it.
void PatchInitReply(struct iovec* iov, int count) {
  auto* out = static_cast<fuse_out_header*>(iov[0].iov_base);
  if (!g_init_pending.load(std::memory_order_acquire) ||
      out->unique != g_init_unique.load(std::memory_order_relaxed))
    return;
  g_init_pending.store(false, std::memory_order_relaxed);
  if (out->error != 0) return;
  if (!g_mmap_offered.load() || count < 2 ||
      iov[1].iov_len < offsetof(fuse_init_out, flags2) + sizeof(uint32_t)) {
    QCOWFS_LOG(Info,
               "the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+): "
               "mmap(MAP_SHARED) of the mounted file fails with ENODEV");
    return;
  }
  auto* arg = static_cast<fuse_init_out*>(iov[1].iov_base);
  arg->flags |= kInitExt;
  arg->flags2 |= kDirectIoAllowMmap2;
}

// --- FOPEN_PARALLEL_DIRECT_WRITES on open replies ---------------------------

// Unique ids of FUSE_OPEN requests not yet answered. g_open_mu is a leaf lock,
// held for a set operation only; g_open_pending lets replies skip it when no
// open is outstanding (nearly always).
std::mutex g_open_mu;
std::unordered_set<uint64_t> g_open_requests;
std::atomic<int> g_open_pending{0};

void NoteRequest(const void* buf, ssize_t n) {
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header))) return;
  const auto* in = static_cast<const fuse_in_header*>(buf);
  if (in->opcode == FUSE_INIT) return NoteInit(buf, n);
  if (in->opcode != FUSE_OPEN) return;
  std::lock_guard<std::mutex> l(g_open_mu);
  if (g_open_requests.insert(in->unique).second) g_open_pending.fetch_add(1);
}

ssize_t Writev(int fd, struct iovec* iov, int count, void*) {
  if (g_init_pending.load(std::memory_order_relaxed) && count >= 1 &&
      iov[0].iov_len >= sizeof(fuse_out_header))
    PatchInitReply(iov, count);
  if (g_open_pending.load(std::memory_order_acquire) > 0 && count >= 1 &&
      iov[0].iov_len >= sizeof(fuse_out_header)) {
    auto* out = static_cast<fuse_out_header*>(iov[0].iov_base);
    bool was_open;
    {
      std::lock_guard<std::mutex> l(g_open_mu);
      was_open = g_open_requests.erase(out->unique) > 0;
      if (was_open) g_open_pending.fetch_sub(1);
    }
    if (was_open && out->error == 0 && count >= 2 && iov[1].iov_len >= sizeof(fuse_open_out)) {
      auto* arg = static_cast<fuse_open_out*>(iov[1].iov_base);
      if (arg->open_flags & FOPEN_DIRECT_IO) arg->open_flags |= FOPEN_PARALLEL_DIRECT_WRITES;
    }
  }
  return ::writev(fd, iov, count);
}

// --- adaptive polling ---------------------------------------------------------

struct Poller {
  int64_t poll_ns = 0;
  std::atomic<int> watchers{0};  // workers polling or asleep on the device
  std::atomic<bool> polling{false};  // one worker is polling
  std::atomic<int> parked{0};    // workers asleep on park
  // Whether the last request a watcher waited for came within poll_ns. When
  // requests come further apart (sporadic I/O), polling only burns CPU others
  // want, so it is skipped until requests come close together again.
  std::atomic<bool> gap_short{true};
  // Whether the last request moved at most kSmallIo bytes. A large request
  // keeps the application busy for long around it (page pinning, copies), and
  // its wakeup is a small part of its cost: no polling after one.
  std::atomic<bool> last_small{true};
  sem_t park;
};
Poller g_poller;

int64_t NowNs() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec;
}

void WakeOneParked() {
  int p = g_poller.parked.load(std::memory_order_acquire);
  while (p > 0) {
    if (g_poller.parked.compare_exchange_weak(p, p - 1, std::memory_order_acq_rel)) {
      sem_post(&g_poller.park);
      return;
    }
  }
}

constexpr uint32_t kSmallIo = 128 * 1024;

// Whether the request reads or writes at most kSmallIo bytes (other requests
// count as small).
bool SmallRequest(const void* buf, ssize_t n) {
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_read_in))) return true;
  const auto* in = static_cast<const fuse_in_header*>(buf);
  if (in->opcode == FUSE_READ) {
    fuse_read_in r;
    std::memcpy(&r, static_cast<const char*>(buf) + sizeof(fuse_in_header), sizeof(r));
    return r.size <= kSmallIo;
  }
  if (in->opcode == FUSE_WRITE) return in->len <= kSmallIo + sizeof(fuse_in_header) + sizeof(fuse_write_in);
  return true;
}

// Records whether the request just taken was small (Poller::last_small); a
// store only when that changes, so workers do not bounce the cache line.
void NoteRequestSize(const void* buf, ssize_t n) {
  bool small = SmallRequest(buf, n);
  if (g_poller.last_small.load(std::memory_order_relaxed) != small)
    g_poller.last_small.store(small, std::memory_order_relaxed);
}

// A request that may keep its worker busy for long (not a READ or WRITE).
bool MayBlock(const void* buf, ssize_t n) {
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header))) return true;
  uint32_t op = static_cast<const fuse_in_header*>(buf)->opcode;
  return op != FUSE_READ && op != FUSE_WRITE;
}

// Whether another request is queued (the device stays readable). Asked only
// when a request was already there on arrival: in a lone request stream the
// next request often is (the application resubmits while the worker returns),
// which is no reason to wake a second worker.
bool MorePending(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

// Stops watching if another worker still watches, and sleeps until woken.
// Returns false (still watching) if this worker is the last watcher.
bool ParkIfOthersWatch() {
  int w = g_poller.watchers.load(std::memory_order_acquire);
  while (w > 1) {
    if (g_poller.watchers.compare_exchange_weak(w, w - 1, std::memory_order_acq_rel)) break;
  }
  if (w <= 1) return false;
  g_poller.parked.fetch_add(1, std::memory_order_acq_rel);
  // sem_wait is a cancellation point: libfuse cancels its workers at the end.
  while (sem_wait(&g_poller.park) < 0 && errno == EINTR) {
  }
  // The waker took this worker off the parked count.
  g_poller.watchers.fetch_add(1, std::memory_order_acq_rel);
  return true;
}

// One worker at a time polls; the others park, or (the last watcher) sleep in
// poll(2) on the device.
// PollingRead's answer when the worker should block in read() instead.
constexpr ssize_t kBlockingRead = -2;

ssize_t PollingRead(int fd, void* buf, size_t len) {
  g_poller.watchers.fetch_add(1, std::memory_order_acq_rel);
  bool waited = false;   // false: the request was queued already
  bool polling = false;  // this worker holds g_poller.polling
  bool parked = false;   // this worker parked while waiting
  int64_t wait_start = 0, deadline = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf, len);
    if (n >= 0 || errno != EAGAIN) {
      int saved = errno;
      if (polling) g_poller.polling.store(false, std::memory_order_release);
      g_poller.watchers.fetch_sub(1, std::memory_order_acq_rel);
      if (n > 0 && waited && !parked) {
        bool short_gap = NowNs() - wait_start <= g_poller.poll_ns;
        if (g_poller.gap_short.load(std::memory_order_relaxed) != short_gap)
          g_poller.gap_short.store(short_gap, std::memory_order_relaxed);
      }
      if (n > 0) NoteRequestSize(buf, n);
      if (n < 0) {
        if (saved != EINTR) ReleaseParkedWorkers();  // ENODEV: the session ends
      } else if ((!waited && g_poller.parked.load(std::memory_order_acquire) > 0 && MorePending(fd)) ||
                 MayBlock(buf, n)) {
        WakeOneParked();
      }
      errno = saved;
      return n;
    }
    if (!waited) {
      waited = true;
      wait_start = NowNs();
    }
    if (!polling) {
      polling = !g_poller.polling.exchange(true, std::memory_order_acq_rel);
      if (polling) {
        bool worth = g_poller.gap_short.load(std::memory_order_relaxed) &&
                     g_poller.last_small.load(std::memory_order_relaxed);
        deadline = worth ? NowNs() + g_poller.poll_ns : 0;
        continue;
      }
      // Another worker polls.
      if (ParkIfOthersWatch()) {
        parked = true;
        if (!g_poller.last_small.load(std::memory_order_relaxed)) break;  // large requests now
        continue;
      }
    } else if (NowNs() < deadline) {
      continue;
    } else {
      g_poller.polling.store(false, std::memory_order_release);
      polling = false;
      if (ParkIfOthersWatch()) {
        parked = true;
        if (!g_poller.last_small.load(std::memory_order_relaxed)) break;  // large requests now
        continue;
      }
    }
    pollfd p{fd, POLLIN, 0};
    if (!g_poller.last_small.load(std::memory_order_relaxed)) break;  // large requests now
    if (::poll(&p, 1, -1) < 0 && errno == EINTR) {
      g_poller.watchers.fetch_sub(1, std::memory_order_acq_rel);
      errno = EINTR;
      return -1;
    }
  }
  g_poller.watchers.fetch_sub(1, std::memory_order_acq_rel);
  return kBlockingRead;
}

// Puts this worker's device fd in non-blocking (polling) or blocking mode; a
// system call only when the mode changes.
void SetNonblocking(int fd, bool on) {
  thread_local int mode_fd = -1;
  thread_local bool mode_nonblocking = false;
  if (mode_fd == fd && mode_nonblocking == on) return;
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
  mode_fd = fd;
  mode_nonblocking = on;
}

ssize_t Read(int fd, void* buf, size_t len, void*) {
  ssize_t n = kBlockingRead;
  if (g_poller.poll_ns > 0 && g_poller.last_small.load(std::memory_order_relaxed)) {
    SetNonblocking(fd, true);
    n = PollingRead(fd, buf, len);
  }
  if (n == kBlockingRead) {
    // Large requests (or polling off): libfuse's way, every worker blocks in
    // read() on the device.
    SetNonblocking(fd, false);
    ReleaseParkedWorkers();
    n = ::read(fd, buf, len);
    if (n > 0 && g_poller.poll_ns > 0) NoteRequestSize(buf, n);
  }
  if (n > 0) {
    int saved = errno;
    NoteRequest(buf, n);
    errno = saved;
  }
  return n;
}

}  // namespace

// libfuse's worker loop ends the session on a read error other than EINTR (ENOENT it
// retries itself), EAGAIN included. A worker can meet EAGAIN in its blocking read:
// when libfuse cannot clone the device fd (FUSE_DEV_IOC_CLONE), every worker reads the
// same open file description, and a polling worker may just have made it non-blocking
// (SetNonblocking remembers only its own thread's last setting). Wait for a request
// then. ENOENT (an interrupted request) is retried here as well.
ssize_t ReadRequest(int fd, void* buf, size_t len, void* userdata) {
  for (;;) {
    ssize_t n = Read(fd, buf, len, userdata);
    if (n >= 0 || errno == EINTR) return n;
    if (errno == ENOENT) continue;
    if (errno != EAGAIN) return n;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, -1) < 0 && errno == EINTR) return -1;
  }
}

bool InstallKernelIo(fuse_session* se, uint32_t poll_us) {
  static std::once_flag once;
  std::call_once(once, [] { sem_init(&g_poller.park, 0, 0); });
  g_poller.poll_ns = static_cast<int64_t>(poll_us) * 1000;
  static const fuse_custom_io io = {Writev, ReadRequest, nullptr, nullptr};
  return fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0;
}

void ReleaseParkedWorkers() {
  while (g_poller.parked.load(std::memory_order_acquire) > 0) WakeOneParked();
}

}  // namespace qcowfs::fuse
