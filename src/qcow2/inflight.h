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
  // A live range's node. Nodes are recycled through a free list, so a request
  // that registers and releases ranges allocates no memory in steady state.
  struct Node {
    HostRange r;
    Node* prev = nullptr;
    Node* next = nullptr;
  };
  using Handle = Node*;

  InFlightTable() = default;
  InFlightTable(const InFlightTable&) = delete;
  InFlightTable& operator=(const InFlightTable&) = delete;
  ~InFlightTable();

  Handle Register(uint64_t start, uint64_t len) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    Node* n = free_;
    if (n) {
      free_ = n->next;
    } else {
      n = new Node;
    }
    n->r = HostRange{start, start + len};
    n->prev = nullptr;
    n->next = live_;
    if (live_) live_->prev = n;
    live_ = n;
    count_++;
    return n;
  }
  void Release(Handle h) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    if (h->prev) h->prev->next = h->next; else live_ = h->next;
    if (h->next) h->next->prev = h->prev;
    h->prev = nullptr;
    h->next = free_;
    free_ = h;
    count_--;
  }
  bool Overlaps(uint64_t start, uint64_t len) EXCLUDES(mu_) {
    MutexLock l(&mu_);
    for (const Node* n = live_; n; n = n->next)
      if (n->r.start < start + len && start < n->r.end) return true;
    return false;
  }
  // Copy of the live ranges (unordered; HostRangeSet sorts them).
  std::vector<HostRange> Snapshot() EXCLUDES(mu_);
  size_t size() EXCLUDES(mu_) {
    MutexLock l(&mu_);
    return count_;
  }

 private:
  Mutex mu_;
  Node* live_ GUARDED_BY(mu_) = nullptr;
  Node* free_ GUARDED_BY(mu_) = nullptr;
  size_t count_ GUARDED_BY(mu_) = 0;
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
