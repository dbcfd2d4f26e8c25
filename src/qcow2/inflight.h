// Tracked requests (SPEC §5): host byte ranges that data I/O is using right now.
//
// A request registers the host ranges it will touch while Qcow2Image::meta_mu_ is
// still held (the mapping and the registration are one atomic step); it releases
// them after its I/O, without meta_mu_. The allocator (under meta_mu_ exclusive)
// treats a refcount-0 cluster that overlaps any live range as not free, so a
// cluster freed by a discard is never reused while an older request still uses it.
// Leaf lock: never calls out while mu_ is held.
#pragma once

#include <cstdint>
#include <list>
#include <utility>
#include <vector>

#include "util/mutex.h"

namespace qcowfs::qcow2 {

struct HostRange {
  uint64_t start;
  uint64_t end;  // exclusive
};

class InFlightTable {
 public:
  using Handle = std::list<HostRange>::iterator;

  Handle Register(uint64_t start, uint64_t len) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    live_.push_front(HostRange{start, start + len});
    return live_.begin();
  }
  void Release(Handle h) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    live_.erase(h);
  }
  bool Overlaps(uint64_t start, uint64_t len) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    for (const auto& r : live_)
      if (r.start < start + len && start < r.end) return true;
    return false;
  }
  // Copy of the live ranges (unordered; HostRangeSet sorts them).
  std::vector<HostRange> Snapshot() EXCLUDES(mu_);
  size_t size() EXCLUDES(mu_) {
    MutexLock l(&mu_);
    return live_.size();
  }

 private:
  Mutex mu_;
  std::list<HostRange> live_ GUARDED_BY(mu_);
};

// Sorted, merged view of live ranges for the allocator.
class HostRangeSet {
 public:
  explicit HostRangeSet(std::vector<HostRange> ranges);
  bool Overlaps(uint64_t start, uint64_t len) const;
  bool empty() const { return ranges_.empty(); }

 private:
  std::vector<HostRange> ranges_;
};

}  // namespace qcowfs::qcow2
