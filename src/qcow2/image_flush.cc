// Qcow2Image: ordered metadata flush, header updates, L1 growth, overlap check,
// corruption, busy guest ranges.
#include <algorithm>
#include <cstring>

#include "qcow2/cluster_info.h"
#include "util/endian.h"
#include "util/log.h"

namespace qcowfs::qcow2 {

Status Qcow2Image::WriteHeaderSync() {
  PatchHeaderFields(header_, &cluster0_);
  RETURN_IF_ERROR(host_->Write(0, cluster0_.data(), header_.header_length));
  RETURN_IF_ERROR(host_->Flush());
  header_dirty_ = false;
  return Status::Ok();
}

Status Qcow2Image::SetDirtyBit() {
  if (dirty_bit_on_disk_ || header_.version < 3) return Status::Ok();
  header_.incompatible |= kIncompatDirty;
  RETURN_IF_ERROR(WriteHeaderSync());
  dirty_bit_on_disk_ = true;
  return Status::Ok();
}

Status Qcow2Image::FlushLocked() {
  if (read_only_) return Status::Ok();
  const uint64_t cs = geo_.cluster_size;
  if (corrupt_) return data_->Flush();  // metadata is frozen once corrupt
  // 0. A refcount table that outgrew its clusters moves to new ones.
  uint64_t capacity = uint64_t{header_.refcount_table_clusters} * cs / 8;
  if (reftable_.size() > capacity) {
    uint64_t old_off = header_.refcount_table_offset, old_n = header_.refcount_table_clusters;
    for (;;) {
      uint64_t want = (reftable_.size() * 8 + cs - 1) / cs;
      ASSIGN_OR_RETURN(uint64_t off, AllocClusters(want));
      if (reftable_.size() * 8 <= want * cs) {
        reftable_.resize(want * cs / 8, 0);
        header_.refcount_table_offset = off;
        header_.refcount_table_clusters = static_cast<uint32_t>(want);
        break;
      }
      FreeLater(off, want);  // the allocation itself grew the table; try again
    }
    RemoveMeta(old_off);
    AddMeta(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs, "refcount table");
    FreeLater(old_off, old_n);
    for (uint64_t i = 0; i < header_.refcount_table_clusters; i++) reftable_dirty_.insert(i);
    header_dirty_ = true;
  }
  bool any_l2 = false, any_rb = false;
  l2_cache_->ForEach([&](TableCache::Entry* e) { any_l2 |= e->dirty; });
  rb_cache_->ForEach([&](TableCache::Entry* e) { any_rb |= e->dirty; });
  if (lazy_refcounts_ && (any_l2 || any_rb || !l1_dirty_.empty())) RETURN_IF_ERROR(SetDirtyBit());
  // 1. Guest data.
  RETURN_IF_ERROR(data_->Flush());
  if (data_ != host_ && (any_l2 || any_rb)) RETURN_IF_ERROR(host_->Flush());
  // 2. Refcount blocks (increments before the entries that use them).
  auto write_dirty = [&](TableCache* cache) {
    Status st;
    cache->ForEach([&](TableCache::Entry* e) {
      if (!e->dirty || !st.ok()) return;
      st = host_->Write(e->offset, e->data.data(), e->data.size());
      if (st.ok()) e->dirty = false;
    });
    return st;
  };
  if (any_rb) {
    RETURN_IF_ERROR(write_dirty(rb_cache_.get()));
    if (!lazy_refcounts_) RETURN_IF_ERROR(host_->Flush());
  }
  // 3. L2 tables.
  if (any_l2) {
    RETURN_IF_ERROR(write_dirty(l2_cache_.get()));
    RETURN_IF_ERROR(host_->Flush());
  }
  // 4a. L1 and refcount table clusters.
  auto write_table = [&](const std::vector<uint64_t>& t, uint64_t base, uint64_t k) -> Status {
    uint64_t per = cs / 8;
    uint64_t first = k * per, last = std::min<uint64_t>(t.size(), first + per);
    if (first >= last) return Status::Ok();
    std::vector<uint8_t> buf((last - first) * 8);
    for (uint64_t i = first; i < last; i++) StoreBE64(&buf[(i - first) * 8], t[i]);
    return host_->Write(base + k * cs, buf.data(), buf.size());
  };
  bool wrote_tables = !l1_dirty_.empty() || !reftable_dirty_.empty();
  for (uint64_t k : l1_dirty_) RETURN_IF_ERROR(write_table(l1_, header_.l1_table_offset, k));
  l1_dirty_.clear();
  for (uint64_t k : reftable_dirty_) RETURN_IF_ERROR(write_table(reftable_, header_.refcount_table_offset, k));
  reftable_dirty_.clear();
  if (wrote_tables) RETURN_IF_ERROR(host_->Flush());
  // 4b. Header (new L1 / refcount table locations, size).
  if (header_dirty_) RETURN_IF_ERROR(WriteHeaderSync());
  // 5. Every dropped reference is durable: release the clusters.
  RETURN_IF_ERROR(ApplyPendingFrees());
  metadata_dirty_ = false;
  return Status::Ok();
}

Status Qcow2Image::GrowL1(uint64_t min_entries) {
  const uint64_t cs = geo_.cluster_size;
  if (min_entries <= l1_.size()) return Status::Ok();
  uint64_t entries = std::max<uint64_t>(min_entries, l1_.size() + l1_.size() / 2);
  if (entries * 8 > kMaxL1Bytes) entries = std::max<uint64_t>(min_entries, kMaxL1Bytes / 8);
  if (entries * 8 > kMaxL1Bytes) return Status::Error(EFBIG, name_ + ": virtual size needs an L1 table over 32 MiB");
  uint64_t n = (entries * 8 + cs - 1) / cs;
  ASSIGN_OR_RETURN(uint64_t off, AllocClusters(n));
  uint64_t old_off = header_.l1_table_offset;
  uint64_t old_n = (l1_.size() * 8 + cs - 1) / cs;
  l1_.resize(entries, 0);
  header_.l1_table_offset = off;
  header_.l1_size = static_cast<uint32_t>(entries);
  header_dirty_ = true;
  for (uint64_t k = 0; k < n; k++) l1_dirty_.insert(k);
  if (old_n) {
    RemoveMeta(old_off);
    FreeLater(old_off, old_n);
  }
  AddMeta(off, n * cs, "active L1 table");
  metadata_dirty_ = true;
  return Status::Ok();
}

Status Qcow2Image::Resize(uint64_t new_size) {
  RETURN_IF_ERROR(CheckWritable());
  WriterLock lock(&meta_mu_);
  if (new_size < header_.size) return Status::Error(EPERM, name_ + ": shrinking is not supported");
  if (new_size == header_.size) return Status::Ok();
  if (new_size > (1ull << 56)) return Status::Error(EFBIG, name_ + ": size too large");
  RETURN_IF_ERROR(GrowL1((new_size + geo_.l2_span() - 1) / geo_.l2_span()));
  header_.size = new_size;
  header_dirty_ = true;
  RETURN_IF_ERROR(FlushLocked());
  size_ = new_size;
  return Status::Ok();
}

void Qcow2Image::AddMeta(uint64_t off, uint64_t len, const char* what) {
  meta_regions_[off] = {off + len, what};
}

void Qcow2Image::RemoveMeta(uint64_t off) { meta_regions_.erase(off); }

const char* Qcow2Image::MetaAt(uint64_t off, uint64_t len) const {
  auto it = meta_regions_.upper_bound(off + len - 1);
  if (it == meta_regions_.begin()) return nullptr;
  --it;
  return it->second.first <= off ? nullptr : it->second.second;
}

Status Qcow2Image::CheckOverlap(uint64_t off, uint64_t len, const char* what) {
  const char* meta = MetaAt(off, len);
  if (!meta) return Status::Ok();
  char buf[256];
  snprintf(buf, sizeof(buf), "%s: preventing invalid %s write at host offset 0x%llx (overlaps with %s)",
           name_.c_str(), what, static_cast<unsigned long long>(off), meta);
  return Status::Corruption(buf);
}

Status Qcow2Image::MarkCorrupt(const std::string& why) {
  if (corrupt_.exchange(true)) return Status::Corruption(why);
  QCOWFS_LOG(Error, "%s; marking image as corrupt, further writes fail", why.c_str());
  WriterLock lock(&meta_mu_);
  if (header_.version >= 3 && !read_only_) {
    header_.incompatible |= kIncompatCorrupt;
    Status s = WriteHeaderSync();
    if (!s.ok()) QCOWFS_LOG(Error, "%s: could not set the corrupt bit: %s", name_.c_str(), s.message().c_str());
  }
  return Status::Corruption(why);
}

Status Qcow2Image::CheckWritable() {
  if (closed_) return Status::IoError(name_ + ": image is closed");
  if (read_only_) return Status::ReadOnly(name_ + ": image is read-only");
  if (corrupt_) return Status::IoError(name_ + ": image is marked corrupt; writes are refused");
  return Status::Ok();
}

Status Qcow2Image::UnlockAndFail(uint64_t gc, Status s) {
  UnlockGuest(gc, gc);
  meta_mu_.Unlock();
  return s;
}

void Qcow2Image::LockGuest(uint64_t first, uint64_t last) {
  for (;;) {
    bool conflict = false;
    for (auto [a, b] : busy_)
      if (a <= last && first <= b) conflict = true;
    if (!conflict) break;
    busy_cv_.Wait(&meta_mu_);
  }
  busy_.emplace_back(first, last);
}

void Qcow2Image::UnlockGuest(uint64_t first, uint64_t last) {
  auto it = std::find(busy_.begin(), busy_.end(), std::make_pair(first, last));
  if (it != busy_.end()) busy_.erase(it);
  busy_cv_.SignalAll();
}

}  // namespace qcowfs::qcow2
