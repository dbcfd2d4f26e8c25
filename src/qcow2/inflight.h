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
  struct Shard;
  struct Node {
    HostRange r;
    Shard* shard = nullptr;
    Node* prev = nullptr;
    Node* next = nullptr;
  };
  using Handle = Node*;

  // The table is split in shards, one per thread (round robin), each on its own cache
  // lines with its own leaf mutex: a request registers in its thread's shard and
  // releases there, so requests on different CPUs share no lock. Readers of the whole
  // table (the allocator, under meta_mu_ exclusive, so no registration races it) lock
  // one shard at a time.
  static constexpr unsigned kShards = 8;
  struct alignas(64) Shard {
    Mutex mu;
    Node* live GUARDED_BY(mu) = nullptr;
    Node* free GUARDED_BY(mu) = nullptr;
    size_t count GUARDED_BY(mu) = 0;
  };

  InFlightTable() = default;
  InFlightTable(const InFlightTable&) = delete;
  InFlightTable& operator=(const InFlightTable&) = delete;
  ~InFlightTable();

  Handle Register(uint64_t start, uint64_t len) {
    Shard& sh = shards_[ThreadShard()];
    MutexLock l(&sh.mu);
    Node* n = sh.free;
    if (n) {
      sh.free = n->next;
    } else {
      n = new Node;
      n->shard = &sh;
    }
    n->r = HostRange{start, start + len};
    n->prev = nullptr;
    n->next = sh.live;
    if (sh.live) sh.live->prev = n;
    sh.live = n;
    sh.count++;
    return n;
  }
  void Release(Handle h) {
    Shard& sh = *h->shard;
    MutexLock l(&sh.mu);
    if (h->prev) h->prev->next = h->next; else sh.live = h->next;
    if (h->next) h->next->prev = h->prev;
    h->prev = nullptr;
    h->next = sh.free;
    sh.free = h;
    sh.count--;
  }
  bool Overlaps(uint64_t start, uint64_t len);
  // Copy of the live ranges (unordered; HostRangeSet sorts them).
  std::vector<HostRange> Snapshot();
  size_t size();

 private:
  static unsigned ThreadShard();
  Shard shards_[kShards];
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
