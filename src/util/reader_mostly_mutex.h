// ReaderMostlyMutex: a reader/writer lock for a lock every request takes shared and
// almost nothing takes exclusively (MirrorFilter::io_mu_: every guest request shared,
// a mirror job's attach, pivot and detach exclusive).
//
// A pthread rwlock keeps one reader count, so every shared lock and unlock writes the
// same cache line from every CPU. Here each thread counts its readers in a slot of its
// own (one cache line per slot, a thread keeps its slot for life), so a shared lock
// touches a line that stays on its CPU, plus a read of the writer flag.
//
// Reader: increment its slot, then look at the writer flag; if set, undo, wait for the
// writer to finish (its mutex), retry. Writer: take the writer mutex, set the flag, then
// wait until every slot is zero. Both steps are sequentially consistent, so either the
// reader sees the flag or the writer sees the reader's count: never neither. Writers are
// preferred: once the flag is set no new reader gets in, so a stream of overlapping
// readers cannot starve a writer. Shared locking is not recursive: a thread that holds
// it shared must not take it shared again (a waiting writer would deadlock them).
// The same thread must unlock what it locked shared (its slot).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>

#include "util/thread_annotations.h"

namespace qcowfs {

class CAPABILITY("mutex") ReaderMostlyMutex {
 public:
  ReaderMostlyMutex() = default;
  ReaderMostlyMutex(const ReaderMostlyMutex&) = delete;
  ReaderMostlyMutex& operator=(const ReaderMostlyMutex&) = delete;

  void Lock() ACQUIRE();
  void Unlock() RELEASE();
  void LockShared() ACQUIRE_SHARED() {
    Slot& s = slots_[ThreadSlot()];
    for (;;) {
      s.readers.fetch_add(1, std::memory_order_seq_cst);
      if (!writer_.load(std::memory_order_seq_cst)) return;
      s.readers.fetch_sub(1, std::memory_order_seq_cst);
      WaitForWriter();
    }
  }
  void UnlockShared() RELEASE_SHARED() {
    slots_[ThreadSlot()].readers.fetch_sub(1, std::memory_order_release);
  }

  static constexpr unsigned kSlots = 16;

 private:
  struct alignas(64) Slot {
    std::atomic<int64_t> readers{0};
  };
  static unsigned ThreadSlot();
  void WaitForWriter();

  Slot slots_[kSlots];
  alignas(64) std::atomic<bool> writer_{false};
  std::mutex wmu_;  // held by a writer for its whole exclusive section
};

class SCOPED_CAPABILITY ReaderMostlyShared {
 public:
  explicit ReaderMostlyShared(ReaderMostlyMutex* mu) ACQUIRE_SHARED(mu) : mu_(mu) { mu_->LockShared(); }
  ~ReaderMostlyShared() RELEASE() { mu_->UnlockShared(); }
  ReaderMostlyShared(const ReaderMostlyShared&) = delete;
  ReaderMostlyShared& operator=(const ReaderMostlyShared&) = delete;

 private:
  ReaderMostlyMutex* mu_;
};

}  // namespace qcowfs
