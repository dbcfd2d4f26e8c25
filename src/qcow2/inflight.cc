#include "qcow2/inflight.h"

#include <algorithm>

namespace qcowfs::qcow2 {

InFlightTable::~InFlightTable() {
  MutexLock l(&mu_);
  for (Node* list : {live_, free_}) {
    while (list) {
      Node* next = list->next;
      delete list;
      list = next;
    }
  }
}

std::vector<HostRange> InFlightTable::Snapshot() {
  MutexLock l(&mu_);
  std::vector<HostRange> out;
  out.reserve(count_);
  for (const Node* n = live_; n; n = n->next) out.push_back(n->r);
  return out;
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
