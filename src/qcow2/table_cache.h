// TableCache: write-back LRU cache of cluster-sized metadata tables (L2 tables or
// refcount blocks), keyed by host offset.
//
// Not internally locked: Qcow2Image::meta_mu_ guards it. Find() and reading
// entry bytes are allowed under the shared lock (the LRU stamp is atomic);
// everything that inserts, evicts or changes bytes needs the exclusive lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace qcowfs::qcow2 {

class TableCache {
 public:
  struct Entry {
    uint64_t offset = 0;
    std::vector<uint8_t> data;
    bool dirty = false;
    std::atomic<uint64_t> last_use{0};
  };

  TableCache(size_t capacity, size_t table_size) : capacity_(capacity < 2 ? 2 : capacity), table_size_(table_size) {}

  Entry* Find(uint64_t offset) {
    auto it = map_.find(offset);
    if (it == map_.end()) return nullptr;
    it->second->last_use.store(clock_.fetch_add(1, std::memory_order_relaxed),
                               std::memory_order_relaxed);
    hits_.fetch_add(1, std::memory_order_relaxed);
    return it->second.get();
  }
  bool full() const { return map_.size() >= capacity_; }
  // Least recently used entry, or nullptr when empty.
  Entry* Victim() {
    Entry* best = nullptr;
    for (auto& [off, e] : map_) {
      if (!best || e->last_use.load(std::memory_order_relaxed) <
                       best->last_use.load(std::memory_order_relaxed))
        best = e.get();
    }
    return best;
  }
  Entry* Insert(uint64_t offset, std::vector<uint8_t> data) {
    auto e = std::make_unique<Entry>();
    e->offset = offset;
    e->data = std::move(data);
    e->last_use.store(clock_.fetch_add(1, std::memory_order_relaxed));
    Entry* raw = e.get();
    map_[offset] = std::move(e);
    misses_.fetch_add(1, std::memory_order_relaxed);
    return raw;
  }
  void Erase(uint64_t offset) { map_.erase(offset); }
  void Clear() { map_.clear(); }
  template <typename F>
  void ForEach(F&& f) {
    for (auto& [off, e] : map_) f(e.get());
  }
  size_t table_size() const { return table_size_; }
  size_t size() const { return map_.size(); }
  uint64_t hits() const { return hits_.load(std::memory_order_relaxed); }
  uint64_t misses() const { return misses_.load(std::memory_order_relaxed); }

 private:
  size_t capacity_;
  size_t table_size_;
  std::unordered_map<uint64_t, std::unique_ptr<Entry>> map_;
  std::atomic<uint64_t> clock_{1};
  std::atomic<uint64_t> hits_{0};
  std::atomic<uint64_t> misses_{0};
};

}  // namespace qcowfs::qcow2
