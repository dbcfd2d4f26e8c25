// ChunkSet: a sparse set of chunk indices kept as disjoint runs (start -> end). The
// mirror job's dirty map and its table of in-flight operations are both ChunkSets, so
// their memory follows the number of runs, not the size of the source (a 64 TiB sparse
// source with a few dirty areas costs a few runs). Not thread-safe: the owner locks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>

namespace qcowfs::mirror {

class ChunkSet {
 public:
  // Adds [first, first+n).
  void Add(uint64_t first, uint64_t n);
  // Removes [first, first+n).
  void Remove(uint64_t first, uint64_t n);
  bool Contains(uint64_t chunk) const;
  // Whether any chunk of [first, first+n) is in the set.
  bool Intersects(uint64_t first, uint64_t n) const;
  // The first run at or after `from`, clipped to start at `from` and to at most max
  // chunks: {start, n}; n == 0 when there is none.
  std::pair<uint64_t, uint64_t> NextRun(uint64_t from, uint64_t max) const;
  uint64_t count() const { return count_; }
  bool empty() const { return count_ == 0; }
  size_t runs() const { return runs_.size(); }

 private:
  std::map<uint64_t, uint64_t> runs_;  // start -> end (exclusive); disjoint, never adjacent
  uint64_t count_ = 0;
};

}  // namespace qcowfs::mirror
