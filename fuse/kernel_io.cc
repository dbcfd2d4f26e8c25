#include "fuse/kernel_io.h"

#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <semaphore.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cerrno>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <unordered_set>

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

#include "fuse/uring_abi.h"
#include "util/log.h"

namespace qcowfs::fuse {
namespace {

// --- The INIT reply: FUSE_DIRECT_IO_ALLOW_MMAP and FUSE_OVER_IO_URING ----------

// Protocol 7.39 (kernel 6.6; Debian 12's <linux/fuse.h> is 7.38 and lacks it):
// FUSE_DIRECT_IO_ALLOW_MMAP is init flag bit 36. Flags 32..63 travel in the
// 32-bit flags2 field of fuse_init_in / fuse_init_out (bit 36 = flags2 bit 4),
// and each side reads flags2 only when the other set FUSE_INIT_EXT (bit 30 of
// flags). With it, the kernel lets a FOPEN_DIRECT_IO file be mmap'ed
// MAP_SHARED (page cache for the mappings only, kept coherent by the kernel:
// kernel_io.h). Without it such an mmap fails with ENODEV. libfuse 3.14 has no
// capability for it. FUSE_OVER_IO_URING (bit 41, uring_abi.h) is taken when the
// ring transport wants it (InitHook).
constexpr uint64_t kDirectIoAllowMmap = 1ULL << 36;

thread_local RingReply* t_ring_reply = nullptr;

std::atomic<const InitHook*> g_init_hook{nullptr};
// The INIT request seen (unique and the flags it offers, flags2 shifted in); its reply
// is patched once (g_init_pending). The plain fields are written before the release
// store and read after the acquire load.
std::atomic<bool> g_init_pending{false};
uint64_t g_init_unique = 0;
uint64_t g_init_offered = 0;

void NoteInit(const void* buf, ssize_t n) {
  if (n < static_cast<ssize_t>(sizeof(fuse_in_header) + offsetof(fuse_init_in, flags) + 4)) return;
  const auto* in = static_cast<const fuse_in_header*>(buf);
  fuse_init_in arg{};
  std::memcpy(&arg, static_cast<const char*>(buf) + sizeof(fuse_in_header),
              std::min(sizeof(arg), static_cast<size_t>(n) - sizeof(fuse_in_header)));
  uint64_t flags = arg.flags;
  // flags2 exists from 7.36 on (fuse_init_in grew then); a shorter request has none.
  if ((arg.flags & uring::kFuseInitExt) &&
      static_cast<size_t>(n) >= sizeof(fuse_in_header) + offsetof(fuse_init_in, flags2) + 4)
    flags |= static_cast<uint64_t>(arg.flags2) << 32;
  g_init_unique = in->unique;
  g_init_offered = flags;
  g_init_pending.store(true, std::memory_order_release);
}

// A successful OPEN reply of a direct-io file: FOPEN_PARALLEL_DIRECT_WRITES too, so the
// kernel does not serialize direct writes to the file under its inode lock.
void PatchOpenReply(struct iovec* iov, int count) {
  if (count < 2 || iov[1].iov_len < sizeof(fuse_open_out)) return;
  if (static_cast<fuse_out_header*>(iov[0].iov_base)->error != 0) return;
  auto* arg = static_cast<fuse_open_out*>(iov[1].iov_base);
  if (arg->open_flags & FOPEN_DIRECT_IO) arg->open_flags |= FOPEN_PARALLEL_DIRECT_WRITES;
}

// Copies a reply into the thread's ring entry. Returns the bytes "written".
ssize_t RingWritev(RingReply* r, struct iovec* iov, int count) {
  if (r->opcode == FUSE_OPEN) PatchOpenReply(iov, count);
  size_t total = 0, len = 0;
  for (int i = 0; i < count; i++) len += iov[i].iov_len;
  auto* out = static_cast<fuse_out_header*>(r->out_header);
  std::memcpy(out, iov[0].iov_base, sizeof(fuse_out_header));
  for (int i = 1; i < count; i++) {
    if (total + iov[i].iov_len > r->payload_cap) {  // cannot happen: payload >= max_read
      out->error = -EIO;
      total = 0;
      break;
    }
    if (iov[i].iov_base != r->payload + total)  // not built in place (ThreadRingPayload)
      std::memmove(r->payload + total, iov[i].iov_base, iov[i].iov_len);
    total += iov[i].iov_len;
  }
  r->payload_len = static_cast<uint32_t>(total);
  r->replied = true;
  return static_cast<ssize_t>(len);
}

// Patches the INIT reply (FUSE_DIRECT_IO_ALLOW_MMAP if offered; FUSE_OVER_IO_URING if
// offered and wanted) and writes it.
ssize_t InitWritev(int fd, struct iovec* iov, int count) {
  const InitHook* hook = g_init_hook.load(std::memory_order_acquire);
  bool ext = (g_init_offered & uring::kFuseInitExt) != 0;
  bool offered = ext && (g_init_offered & uring::kFuseOverIoUring) != 0;
  bool taken = false;
  size_t payload = 0;
  auto* out = static_cast<fuse_out_header*>(iov[0].iov_base);
  bool has_flags2 = count >= 2 && iov[1].iov_len >= offsetof(fuse_init_out, flags2) + sizeof(uint32_t);
  if (out->error == 0 && has_flags2) {
    auto* arg = static_cast<fuse_init_out*>(iov[1].iov_base);
    if (ext && (g_init_offered & kDirectIoAllowMmap)) {
      arg->flags |= uring::kFuseInitExt;
      arg->flags2 |= static_cast<uint32_t>(kDirectIoAllowMmap >> 32);
    } else {
      QCOWFS_LOG(Info,
                 "the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+): "
                 "mmap(MAP_SHARED) of the mounted file fails with ENODEV");
    }
    if (hook && offered && hook->want(hook->ctx)) {
      arg->flags |= uring::kFuseInitExt;
      arg->flags2 |= static_cast<uint32_t>(uring::kFuseOverIoUring >> 32);
      taken = true;
    }
    long page = sysconf(_SC_PAGESIZE);
    payload = std::max<size_t>({8192, arg->max_write,
                                static_cast<size_t>(arg->max_pages) * static_cast<size_t>(page > 0 ? page : 4096)});
  } else if (out->error == 0) {
    QCOWFS_LOG(Info,
               "the kernel does not offer FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+): "
               "mmap(MAP_SHARED) of the mounted file fails with ENODEV");
  }
  ssize_t n = ::writev(fd, iov, count);
  int saved = errno;
  if (hook) hook->done(hook->ctx, n >= 0 && out->error == 0, offered, taken && n >= 0, payload);
  errno = saved;
  return n;
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
  if (RingReply* r = t_ring_reply; r && count >= 1 && iov[0].iov_len >= sizeof(fuse_out_header) &&
                                   static_cast<fuse_out_header*>(iov[0].iov_base)->unique == r->unique && !r->replied)
    return RingWritev(r, iov, count);
  if (g_init_pending.load(std::memory_order_acquire) && count >= 1 && iov[0].iov_len >= sizeof(fuse_out_header) &&
      static_cast<fuse_out_header*>(iov[0].iov_base)->unique == g_init_unique &&
      g_init_pending.exchange(false, std::memory_order_acq_rel))
    return InitWritev(fd, iov, count);
  if (g_open_pending.load(std::memory_order_acquire) > 0 && count >= 1 &&
      iov[0].iov_len >= sizeof(fuse_out_header)) {
    auto* out = static_cast<fuse_out_header*>(iov[0].iov_base);
    bool was_open;
    {
      std::lock_guard<std::mutex> l(g_open_mu);
      was_open = g_open_requests.erase(out->unique) > 0;
      if (was_open) g_open_pending.fetch_sub(1);
    }
    if (was_open) PatchOpenReply(iov, count);
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

ssize_t WriteReply(int fd, struct iovec* iov, int count, void* userdata) { return Writev(fd, iov, count, userdata); }

void SetThreadRingReply(RingReply* r) { t_ring_reply = r; }

uint8_t* ThreadRingPayload(size_t len) {
  RingReply* r = t_ring_reply;
  return r && !r->replied && len <= r->payload_cap ? r->payload : nullptr;
}

void SetInitHook(const InitHook* hook) { g_init_hook.store(hook, std::memory_order_release); }

void ReleaseParkedWorkers() {
  while (g_poller.parked.load(std::memory_order_acquire) > 0) WakeOneParked();
}

}  // namespace qcowfs::fuse
