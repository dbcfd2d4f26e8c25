#include "qcow2/inflight.h"

#include <algorithm>
#include <atomic>

namespace qcowfs::qcow2 {

InFlightTable::~InFlightTable() {
  for (Shard& sh : shards_) {
    MutexLock l(&sh.mu);
    for (Node* list : {sh.live, sh.free}) {
      while (list) {
        Node* next = list->next;
        delete list;
        list = next;
      }
    }
  }
}

unsigned InFlightTable::ThreadShard() {
  static std::atomic<unsigned> next{0};
  thread_local unsigned shard = next.fetch_add(1, std::memory_order_relaxed) % kShards;
  return shard;
}

bool InFlightTable::Overlaps(uint64_t start, uint64_t len) {
  for (Shard& sh : shards_) {
    MutexLock l(&sh.mu);
    for (const Node* n = sh.live; n; n = n->next)
      if (n->r.start < start + len && start < n->r.end) return true;
  }
  return false;
}

std::vector<HostRange> InFlightTable::Snapshot() {
  std::vector<HostRange> out;
  for (Shard& sh : shards_) {
    MutexLock l(&sh.mu);
    for (const Node* n = sh.live; n; n = n->next) out.push_back(n->r);
  }
  return out;
}

size_t InFlightTable::size() {
  size_t total = 0;
  for (Shard& sh : shards_) {
    MutexLock l(&sh.mu);
    total += sh.count;
  }
  return total;
}

HostRangeSet::HostRangeSet(std::vector<HostRange> ranges) {
  std::sort(ranges.begin(), ranges.end(),
            [](const HostRange& a, const HostRange& b) { return a.start < b.start; });
  for (const auto& r : ranges) {
    if (!ranges_.empty() && r.start <= ranges_.back().end)
      ranges_.back().end = std::max(ranges_.back().end, r.end);
    else
      ranges_.push_back(r);
  }
}

bool HostRangeSet::Overlaps(uint64_t start, uint64_t len) const {
  // First range whose end is beyond start.
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), start,
                             [](uint64_t s, const HostRange& r) { return s < r.end; });
  return it != ranges_.end() && it->start < start + len;
}

}  // namespace qcowfs::qcow2
