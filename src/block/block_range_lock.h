// BlockRangeLock: a reader/writer lock over byte ranges of one host file, for
// RawFileDevice in O_DIRECT mode. A read-modify-write of a partial host block holds its
// aligned range exclusively (no other write of those blocks between its read and its
// write); every other content change (aligned write, write-zeroes, punch) holds its range
// shared, so it is ordered against an RMW of the same blocks but runs in parallel with
// the others. A waiting exclusive request blocks new shared ones that overlap it (no
// starvation under a steady stream of aligned writes). Ranges are held across I/O; the
// internal mutex never is (a leaf, taken inside the device only).
#pragma once

#include <cstdint>
#include <vector>

#include "util/mutex.h"

namespace qcowfs::block {

class BlockRangeLock {
 public:
  // Holds [start, end) until destroyed. Never hold two guards of one lock at once.
  class Guard {
   public:
    Guard(BlockRangeLock* lock, uint64_t start, uint64_t end, bool exclusive)
        : lock_(lock), id_(lock ? lock->Acquire(start, end, exclusive) : 0) {}
    ~Guard() {
      if (lock_) lock_->Release(id_);
    }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

   private:
    BlockRangeLock* lock_;
    uint64_t id_;
  };

  uint64_t Acquire(uint64_t start, uint64_t end, bool exclusive) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    const uint64_t id = next_id_++;
    // A waiting exclusive request is listed at once, so overlapping shared requests
    // that come later queue behind it.
    entries_.push_back({start, end, exclusive, /*held=*/false, id});
    while (Conflicts(start, end, exclusive, id)) cv_.Wait(&mu_);
    for (auto& e : entries_)
      if (e.id == id) e.held = true;
    return id;
  }

  void Release(uint64_t id) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    for (size_t i = 0; i < entries_.size(); i++)
      if (entries_[i].id == id) {
        entries_[i] = entries_.back();
        entries_.pop_back();
        break;
      }
    cv_.SignalAll();
  }

 private:
  struct Entry {
    uint64_t start, end;
    bool exclusive;
    bool held;
    uint64_t id;
  };

  // An exclusive request waits for overlapping held ranges; a shared one also for
  // overlapping exclusive requests still waiting (listed before it).
  bool Conflicts(uint64_t start, uint64_t end, bool exclusive, uint64_t id) const REQUIRES(mu_) {
    for (const auto& e : entries_) {
      if (e.id == id || e.end <= start || end <= e.start) continue;
      if (e.held && (exclusive || e.exclusive)) return true;
      if (!e.held && !exclusive && e.exclusive && e.id < id) return true;
    }
    return false;
  }

  Mutex mu_;
  CondVar cv_;
  std::vector<Entry> entries_ GUARDED_BY(mu_);
  uint64_t next_id_ GUARDED_BY(mu_) = 1;
};

}  // namespace qcowfs::block
