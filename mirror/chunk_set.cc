#include "mirror/chunk_set.h"

#include <algorithm>

namespace qcowfs::mirror {

void ChunkSet::Add(uint64_t first, uint64_t n) {
  if (n == 0) return;
  uint64_t a = first, b = first + n;
  // Merge with every run that overlaps or touches [a, b).
  auto it = runs_.upper_bound(a);
  if (it != runs_.begin()) {
    auto prev = std::prev(it);
    if (prev->second >= a) it = prev;
  }
  while (it != runs_.end() && it->first <= b) {
    a = std::min(a, it->first);
    b = std::max(b, it->second);
    count_ -= it->second - it->first;
    it = runs_.erase(it);
  }
  runs_[a] = b;
  count_ += b - a;
}

void ChunkSet::Remove(uint64_t first, uint64_t n) {
  if (n == 0) return;
  uint64_t a = first, b = first + n;
  auto it = runs_.upper_bound(a);
  if (it != runs_.begin() && std::prev(it)->second > a) it = std::prev(it);
  while (it != runs_.end() && it->first < b) {
    uint64_t s = it->first, e = it->second;
    count_ -= e - s;
    it = runs_.erase(it);
    if (s < a) {
      runs_[s] = a;
      count_ += a - s;
    }
    if (e > b) {
      runs_[b] = e;
      count_ += e - b;
      break;
    }
  }
}

bool ChunkSet::Contains(uint64_t chunk) const { return Intersects(chunk, 1); }

bool ChunkSet::Intersects(uint64_t first, uint64_t n) const {
  if (n == 0) return false;
  auto it = runs_.upper_bound(first);
  if (it != runs_.begin() && std::prev(it)->second > first) return true;
  return it != runs_.end() && it->first < first + n;
}

std::pair<uint64_t, uint64_t> ChunkSet::NextRun(uint64_t from, uint64_t max) const {
  auto it = runs_.upper_bound(from);
  if (it != runs_.begin() && std::prev(it)->second > from) {
    --it;
    return {from, std::min(max, it->second - from)};
  }
  if (it == runs_.end()) return {0, 0};
  return {it->first, std::min(max, it->second - it->first)};
}

}  // namespace qcowfs::mirror
