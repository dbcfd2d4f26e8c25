// MirrorJob: copies a mounted image live to a target (SPEC §6).
//
// State: a sparse dirty map (ChunkSet of chunks at the job's granularity) and one table
// of claimed chunks. Every operation that writes the target (a background copy, a
// write-blocking guest write, a copy-on-read) first claims its whole range, waiting while
// any part is claimed, so no two target writes to one chunk are ever in flight and a stale
// copy never lands after a newer one. A copy clears the dirty bits of its range when it
// claims it, before it reads the source; a guest write marks its chunks dirty after it
// completed on the source (so a copy that read too early is redone).
//
// Threads: a coordinator (scans the source into the dirty map, declares ready, runs
// complete/cancel/failure and detaches from the filter) and copy workers (each copies
// one claimed range at a time; together they keep at most buf_size in flight).
//
// Lock order: MirrorFilter::io_mu_ -> mu_ -> the source image's and target's own locks.
// mu_ is never held across I/O.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "block/block_device.h"
#include "config/control_protocol.h"
#include "config/mirror_job.h"
#include "mirror/chunk_set.h"
#include "mirror/mirror_filter.h"
#include "util/mutex.h"
#include "util/thread_annotations.h"

namespace qcowfs::mirror {

enum class JobState { kRunning, kReady, kCompleted, kCancelled, kFailed };
const char* StateName(JobState s);

// The opened target: the device written, whether it is known to read zeros (a new file),
// and how to close it clean (a qcow2 target writes its metadata and clears its dirty bit).
struct Target {
  std::unique_ptr<block::BlockDevice> dev;
  bool known_zero = false;
  std::string desc;  // for messages: the path or URI
  // Makes every request in flight on the target fail at once (NBD: drop the connection),
  // so cancel returns promptly even with a hung server. Empty: nothing to do.
  std::function<void()> abort;
};

class MirrorJob {
 public:
  // source: the image under filter. granularity: resolved (power of two, 4K..64M).
  MirrorJob(config::MirrorJobConfig cfg, uint64_t granularity, std::string image_name, MirrorFilter* filter,
            block::BlockDevice* source, Target target);
  ~MirrorJob();
  MirrorJob(const MirrorJob&) = delete;
  MirrorJob& operator=(const MirrorJob&) = delete;

  // sync "top" of a source with a backing file: `top` reports what the source's own layer
  // allocates. Only those ranges are copied (data, or zeros that hide the backing file);
  // the rest is left to the target's backing file, the same base. Before Start().
  using StatusFn = std::function<Result<block::BlockStatus>(uint64_t off, uint64_t len)>;
  void set_top_only(StatusFn top) { top_ = std::move(top); }

  // Attaches to the filter (guest writes are recorded from here on) and starts copying.
  void Start();

  // Guest hooks, called by the filter with its shared lock held. A guest write, zero or
  // discard calls BeforeGuestWrite before it writes the source: under write-blocking
  // semantics it claims the range (returns true), so overlapping guest writes reach the
  // target in the order they reached the source. AfterGuestWrite gets that result and
  // whether the source write succeeded.
  Status GuestRead(block::BlockDevice* src, uint64_t off, void* buf, size_t len);
  bool BeforeGuestWrite(uint64_t off, uint64_t len);
  void AfterGuestWrite(uint64_t off, uint64_t len, const void* data, bool may_unmap, bool claimed, bool source_ok);

  // Refused unless ready; returns once completed (pivoted or not) or failed.
  Status Complete(bool pivot);
  // Stops mirroring in any state; returns once no request reaches the target any more.
  void Cancel();
  void SetSpeed(uint64_t bytes_per_second);
  // Waits until the job is ready or has ended (or timeout_ms passed); returns the state.
  JobState WaitReadyOrEnd(int64_t timeout_ms);

  config::MirrorReport Report() const;
  JobState state() const;
  const std::string& id() const { return cfg_.id; }
  const std::string& image() const { return image_name_; }
  bool pivoted() const { return pivoted_.load(); }
  // After a pivot the target serves the mount; the daemon closes it at unmount.
  Status CloseTarget();

  // Test hook: clear dirty bits after the source read instead of when the range is
  // claimed, to show that the race tests catch a stale copy. Never set otherwise.
  void set_unsafe_clear_after_read(bool on) { unsafe_clear_after_read_ = on; }

 private:
  void Coordinate();
  void Worker();
  Status ScanSource();
  Status CopyChunks(uint64_t first, uint64_t n, std::vector<uint8_t>* buf);
  // After claiming [first, first+n): if the source reads zeros from there on past the
  // run, claims the dirty, unclaimed chunks that follow (up to 1 GiB in all) and returns
  // how many.
  uint64_t ClaimZeroRun(uint64_t first, uint64_t n) EXCLUDES(mu_);
  // What to do with the first extent of [off, off+len): kData copy, kZero write zeroes,
  // kUnallocated skip (the target reads the same there already).
  Result<block::BlockStatus> PlanExtent(uint64_t off, uint64_t len, bool first_scan);
  Status WriteTarget(uint64_t off, uint64_t len, const uint8_t* data);
  // Dirty & unclaimed run to copy next, at most max chunks (n == 0: none).
  std::pair<uint64_t, uint64_t> PickLocked(uint64_t max) REQUIRES(mu_);
  void FailLocked(const Status& s) REQUIRES(mu_);
  void MarkDirtyLocked(uint64_t first, uint64_t n) REQUIRES(mu_);
  void NoteCopiedLocked(uint64_t bytes) REQUIRES(mu_);
  void WakeAll();  // signals both condition variables
  bool QuiescentLocked() const REQUIRES(mu_) { return dirty_.empty() && claimed_.empty(); }
  // Nothing dirty and no copy (background or copy-on-read) in flight: ready, and where
  // complete pauses the guest. Write-blocking guest writes in flight do not count (they are
  // on the target before they return); under a steady write load some always are.
  bool CaughtUpLocked() const REQUIRES(mu_) { return dirty_.empty() && inflight_bytes_ == 0; }
  uint64_t ChunkBytes(uint64_t first, uint64_t n) const;
  void Detach();
  Status TargetError(const Status& s) const;

  const config::MirrorJobConfig cfg_;
  const uint64_t g_;  // granularity
  const std::string image_name_;
  MirrorFilter* const filter_;
  block::BlockDevice* const source_;
  Target target_;
  StatusFn top_;  // set: sync "top"
  const uint64_t size_;
  const uint64_t chunks_;
  const uint64_t max_op_chunks_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();

  mutable Mutex mu_;
  CondVar cv_;       // state, claims, readiness: the coordinator, guest writes waiting for a claim, callers
  CondVar work_cv_;  // copy workers waiting for dirty chunks, room in buf_size or the speed budget
  int claim_waiters_ GUARDED_BY(mu_) = 0;  // guest writes waiting in BeforeGuestWrite
  JobState state_ GUARDED_BY(mu_) = JobState::kRunning;
  std::string error_ GUARDED_BY(mu_);
  ChunkSet dirty_ GUARDED_BY(mu_);
  ChunkSet claimed_ GUARDED_BY(mu_);
  uint64_t inflight_bytes_ GUARDED_BY(mu_) = 0;
  uint64_t cursor_ GUARDED_BY(mu_) = 0;
  bool scan_done_ GUARDED_BY(mu_) = false;
  bool stop_ GUARDED_BY(mu_) = false;          // workers and hooks stop
  bool cancel_ GUARDED_BY(mu_) = false;
  bool complete_ GUARDED_BY(mu_) = false;      // complete requested
  bool pivot_ GUARDED_BY(mu_) = false;
  bool completing_ GUARDED_BY(mu_) = false;    // write-blocking semantics from here on
  bool finished_ GUARDED_BY(mu_) = false;      // coordinator done: nothing reaches the target
  uint64_t speed_ GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point next_copy_ GUARDED_BY(mu_);
  uint64_t bytes_done_ GUARDED_BY(mu_) = 0;
  uint64_t bytes_total_ GUARDED_BY(mu_) = 0;
  uint64_t copied_data_ GUARDED_BY(mu_) = 0;  // for speed_bps
  // speed_bps is the rate of the last second or two, not the job's lifetime average.
  std::chrono::steady_clock::time_point rate_mark_ GUARDED_BY(mu_) = started_;
  uint64_t rate_mark_bytes_ GUARDED_BY(mu_) = 0;
  uint64_t rate_bps_ GUARDED_BY(mu_) = 0;
  std::atomic<bool> pivoted_{false};
  // Data bytes written to the target since its writeback was last started (WriteTarget).
  static constexpr uint64_t kWritebackBytes = 8ull << 20;
  std::atomic<uint64_t> unkicked_bytes_{0};
  bool target_closed_ = false;  // coordinator / CloseTarget only
  std::atomic<bool> unsafe_clear_after_read_{false};

  std::thread coordinator_;
  std::vector<std::thread> workers_;
};

}  // namespace qcowfs::mirror
