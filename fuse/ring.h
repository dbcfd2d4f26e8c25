// FuseRing: FUSE over io_uring (Linux 6.14+, uring_abi.h), next to /dev/fuse.
//
// Where the kernel offers it (module parameter enable_uring=Y: the INIT request
// carries FUSE_OVER_IO_URING), the INIT reply takes it (kernel_io.h) and ring threads
// register entries: one io_uring per thread (128-byte SQEs), `threads_per_queue`
// threads per queue, one queue per possible CPU (the kernel uses the ring only once
// every queue has an entry), one entry per thread, each thread pinned to its queue's
// CPU. A thread waits for its entry's request, hands it to libfuse
// (fuse_session_process_buf, in the thread: every handler replies before it
// returns), kernel_io's writev hook copies the reply into the entry, and the thread
// commits it and fetches the next request in one COMMIT_AND_FETCH. One request per
// thread at a time: a request that blocks (fsync) holds up only its thread, the
// queue's other threads serve the rest.
//
// /dev/fuse stays served by the FuseServer's workers: INIT, FORGET, INTERRUPT and
// everything when the ring is not used (parameter off, kernel without it,
// registration failed).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "util/mutex.h"
#include "util/status.h"

struct fuse_session;

namespace qcowfs::fuse {

enum class Transport {
  kAuto,    // the ring where the kernel offers it, else /dev/fuse
  kLegacy,  // /dev/fuse only
  kRing,    // the ring, or fail
};
const char* TransportName(Transport t);
// "auto", "legacy" or "ring".
bool ParseTransport(std::string_view s, Transport* t);

// Empty if this kernel offers FUSE over io_uring now, else why not (one line). With
// probe_io_uring, also sets up (and closes) an io_uring with 128-byte SQEs, which
// io_uring_disabled or a seccomp filter can refuse.
std::string RingUnavailableReason(bool probe_io_uring = false);

// The number of FUSE ring queues the kernel expects: the possible CPUs.
unsigned PossibleCpus();

class FuseRing {
 public:
  // `required`: a failure after the mount ends the session (transport ring).
  FuseRing(fuse_session* se, unsigned threads_per_queue, bool required);
  ~FuseRing();
  FuseRing(const FuseRing&) = delete;
  FuseRing& operator=(const FuseRing&) = delete;

  // Starts the ring threads; each creates its io_uring and waits for the INIT.
  // Installs the INIT hook. An error: no ring (nothing negotiated).
  Status Prepare();
  // Ends the ring threads and waits for them (the session ended). Idempotent.
  void Stop();

  // Every thread registered its entry.
  bool active() const { return active_.load(std::memory_order_acquire); }
  // Why the ring is not in use (empty while active or not yet decided).
  std::string failure() const;
  unsigned queues() const { return queues_; }
  unsigned threads_per_queue() const { return per_queue_; }

 private:
  struct Worker;
  enum class Phase { kWaiting, kRegister, kStop };

  static bool WantHook(void* ctx);
  static void DoneHook(void* ctx, bool ok, bool offered, bool taken, size_t payload_size);
  void Main(Worker* w);
  void Serve(Worker* w);
  void Fail(const std::string& why);

  fuse_session* se_;
  int fd_;
  unsigned per_queue_;
  bool required_;
  unsigned queues_ = 0;
  int stop_fd_ = -1;  // eventfd: readable once the ring threads should end
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<bool> active_{false};
  std::atomic<int> registered_{0};
  std::atomic<bool> stopped_{false};

  mutable Mutex mu_;
  CondVar cv_;
  Phase phase_ GUARDED_BY(mu_) = Phase::kWaiting;
  unsigned created_ GUARDED_BY(mu_) = 0;  // threads that tried to create their io_uring
  int create_err_ GUARDED_BY(mu_) = 0;
  size_t payload_size_ GUARDED_BY(mu_) = 0;
  std::string failure_ GUARDED_BY(mu_);
};

}  // namespace qcowfs::fuse
