// Qcow2Image: ordered metadata flush, header updates, L1 growth, overlap check,
// corruption, busy guest ranges.
#include <algorithm>
#include <cstring>

#include "qcow2/cluster_info.h"
#include "util/endian.h"
#include "util/log.h"

namespace qcowfs::qcow2 {

// Writes h over the header as on disk and syncs it; h becomes the on-disk header.
Status Qcow2Image::WriteHeader(const Header& h) {
  PatchHeaderFields(h, &cluster0_);
  RETURN_IF_ERROR(host_->Write(0, cluster0_.data(), h.header_length));
  RETURN_IF_ERROR(SyncDevice(host_));
  disk_header_ = h;
  return Status::Ok();
}

Status Qcow2Image::WriteHeaderSync() {
  RETURN_IF_ERROR(WriteHeader(header_));
  header_dirty_ = false;
  return Status::Ok();
}

// The dirty bit goes onto the header as it is on disk: header_ may already name an
// L1 table, refcount table or size whose tables are not written yet.
Status Qcow2Image::SetDirtyBit() {
  if (dirty_bit_on_disk_ || header_.version < 3) return Status::Ok();
  Header h = disk_header_;
  h.incompatible |= kIncompatDirty;
  RETURN_IF_ERROR(WriteHeader(h));
  header_.incompatible |= kIncompatDirty;
  dirty_bit_on_disk_ = true;
  return Status::Ok();
}

// fdatasync of a host device. A failure is remembered: Linux drops the pages whose
// writeback failed, so no later flush of this image may report success (QEMU does the
// same); the image has to be reopened.
Status Qcow2Image::SyncDevice(block::BlockDevice* dev) {
  if (!flush_error_.ok()) return flush_error_;
  Status s = dev->Flush();
  if (!s.ok()) {
    flush_error_ = Status::Error(s.err() ? s.err() : EIO,
                                 name_ + ": an earlier host flush failed (" + s.message() +
                                     "); writes since then may be lost, so every flush fails until the image is reopened");
    QCOWFS_LOG(Error, "%s", flush_error_.message().c_str());
    return s;
  }
  return Status::Ok();
}

bool Qcow2Image::MetadataDirtyLocked() {
  bool dirty = header_dirty_ || !l1_dirty_.empty() || !reftable_dirty_.empty() || !pending_free_.empty();
  l2_cache_->ForEach([&](TableCache::Entry* e) { dirty |= e->dirty; });
  rb_cache_->ForEach([&](TableCache::Entry* e) { dirty |= e->dirty; });
  return dirty;
}

// The ordered flush. Each step is durable before the next one starts, so a crash
// (process kill or power loss) at any point leaves an image whose every pointer leads
// to a complete table and whose every used cluster has its refcount:
//   1. guest data;
//   2. refcount blocks (new blocks and increments);
//   3. refcount-table entries for new blocks; after a relocation the new table, then
//      the header naming it (with the L1 fields as they are on disk);
//   4. L2 tables;  5. L1 clusters;  6. the header (L1 location, size);
//   7. only now are dropped references durable: freed clusters are decremented.
// A table is marked clean only once the sync after its write succeeded.
Status Qcow2Image::FlushLocked() {
  if (read_only_) return Status::Ok();
  if (!flush_error_.ok()) return flush_error_;
  const uint64_t cs = geo_.cluster_size;
  if (corrupt_) {
    // Metadata is frozen once corrupt: a flush that would have to write it fails.
    if (MetadataDirtyLocked())
      return Status::IoError(name_ + ": image is marked corrupt; metadata changed before that cannot be written");
    return SyncDevice(data_);
  }
  // 0. A refcount table that outgrew its clusters moves to new ones.
  uint64_t capacity = uint64_t{header_.refcount_table_clusters} * cs / 8;
  if (reftable_.size() > capacity) {
    uint64_t old_off = header_.refcount_table_offset, old_n = header_.refcount_table_clusters;
    for (;;) {
      uint64_t want = (reftable_.size() * 8 + cs - 1) / cs;
      ASSIGN_OR_RETURN(uint64_t off, AllocClusters(want, true));
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
  if (lazy_refcounts_ && (any_l2 || any_rb || !l1_dirty_.empty() || !reftable_dirty_.empty()))
    RETURN_IF_ERROR(SetDirtyBit());
  // 1. Guest data.
  RETURN_IF_ERROR(SyncDevice(data_));
  if (data_ != host_ && (any_l2 || any_rb)) RETURN_IF_ERROR(SyncDevice(host_));
  std::vector<TableCache::Entry*> written;
  auto write_dirty = [&](TableCache* cache) {
    Status st;
    cache->ForEach([&](TableCache::Entry* e) {
      if (!e->dirty || !st.ok()) return;
      st = host_->Write(e->offset, e->data.data(), e->data.size());
      if (st.ok()) written.push_back(e);
    });
    return st;
  };
  // Call after a successful SyncDevice(host_): what was written is durable now.
  auto mark_clean = [&] {
    for (TableCache::Entry* e : written) e->dirty = false;
    written.clear();
  };
  // 2. Refcount blocks. With lazy refcounts the dirty bit stands in for their
  // ordering; their sync comes with the L2 tables'.
  if (any_rb) {
    RETURN_IF_ERROR(write_dirty(rb_cache_.get()));
    if (!lazy_refcounts_) {
      RETURN_IF_ERROR(SyncDevice(host_));
      mark_clean();
    }
  }
  auto write_table = [&](const std::vector<uint64_t>& t, uint64_t base, uint64_t k) -> Status {
    uint64_t per = cs / 8;
    uint64_t first = k * per, last = std::min<uint64_t>(t.size(), first + per);
    if (first >= last) return Status::Ok();
    std::vector<uint8_t> buf((last - first) * 8);
    for (uint64_t i = first; i < last; i++) StoreBE64(&buf[(i - first) * 8], t[i]);
    return host_->Write(base + k * cs, buf.data(), buf.size());
  };
  // 3. Refcount-table entries of new blocks (each block is durable by now), and after a
  // relocation the header that names the new table: before any L2 entry relies on them.
  if (!reftable_dirty_.empty()) {
    if (!written.empty()) {  // lazy refcounts: blocks before pointers still
      RETURN_IF_ERROR(SyncDevice(host_));
      mark_clean();
    }
    for (uint64_t k : reftable_dirty_) RETURN_IF_ERROR(write_table(reftable_, header_.refcount_table_offset, k));
    RETURN_IF_ERROR(SyncDevice(host_));
    reftable_dirty_.clear();
  }
  if (disk_header_.refcount_table_offset != header_.refcount_table_offset ||
      disk_header_.refcount_table_clusters != header_.refcount_table_clusters) {
    Header h = disk_header_;
    h.refcount_table_offset = header_.refcount_table_offset;
    h.refcount_table_clusters = header_.refcount_table_clusters;
    RETURN_IF_ERROR(WriteHeader(h));
  }
  // 4. L2 tables.
  if (any_l2 || !written.empty()) {
    RETURN_IF_ERROR(write_dirty(l2_cache_.get()));
    RETURN_IF_ERROR(SyncDevice(host_));
    mark_clean();
  }
  // 5. L1 clusters.
  if (!l1_dirty_.empty()) {
    for (uint64_t k : l1_dirty_) RETURN_IF_ERROR(write_table(l1_, header_.l1_table_offset, k));
    RETURN_IF_ERROR(SyncDevice(host_));
    l1_dirty_.clear();
  }
  // 6. Header (new L1 location, size).
  if (header_dirty_) RETURN_IF_ERROR(WriteHeaderSync());
  // 7. Every dropped reference is durable: release the clusters.
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
  ASSIGN_OR_RETURN(uint64_t off, AllocClusters(n, true));
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

// Grows the virtual size. The new area must read zeros: over a backing file that is
// longer than the old size it gets zero clusters (as QEMU does since 5.0); with a raw
// data file, that file grows and every new L2 entry points at it (it stays a full raw
// image of the disk). The header with the new size is written last, by the flush.
Status Qcow2Image::Resize(uint64_t new_size) {
  RETURN_IF_ERROR(CheckWritable());
  uint64_t old_size;
  {
    WriterLock lock(&meta_mu_);
    if (new_size < header_.size) return Status::Error(EPERM, name_ + ": shrinking is not supported");
    if (new_size == header_.size) return Status::Ok();
    if (new_size > (1ull << 56)) return Status::Error(EFBIG, name_ + ": size too large");
    old_size = header_.size;
    if (data_file_raw_ && data_->Size() < new_size) RETURN_IF_ERROR(data_->Resize(new_size));
    RETURN_IF_ERROR(GrowL1((new_size + geo_.l2_span() - 1) / geo_.l2_span()));
    header_.size = new_size;
    header_dirty_ = true;
  }
  // size_ still has the old size: nothing reads the new area before it is ready.
  Status s;
  uint64_t bsize = backing_ ? backing_->Size() : 0;
  if (bsize > old_size) s = ZeroRange(old_size, std::min(new_size, bsize) - old_size, false, false);
  if (s.ok() && data_file_raw_) s = MapRawDataFile(old_size, new_size);
  WriterLock lock(&meta_mu_);
  if (!s.ok()) {
    header_.size = old_size;  // the grown L1 table stays; it is valid for the old size
    return s;
  }
  RETURN_IF_ERROR(FlushLocked());
  size_ = new_size;
  return Status::Ok();
}

// Points the L2 entries of guest clusters in [from, to) that are not allocated yet at
// the raw data file (guest offset = host offset), reading what the file holds.
Status Qcow2Image::MapRawDataFile(uint64_t from, uint64_t to) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t end = (to + cs - 1) / cs;
  for (uint64_t gc = from / cs; gc < end;) {
    WriterLock lock(&meta_mu_);
    const uint64_t l1i = gc / geo_.l2_entries;
    ASSIGN_OR_RETURN(TableCache::Entry * t, L2ForWrite(l1i));
    for (; gc < end && gc / geo_.l2_entries == l1i; gc++) {
      ClusterInfo ci = Decode(t->data.data(), gc);
      if (ci.type == ClusterInfo::kNormal) continue;
      Encode(t->data.data(), gc % geo_.l2_entries, (gc * cs) | kOflagCopied, geo_.extended_l2 ? kBitmapAllAlloc : 1);
      t->dirty = true;
      metadata_dirty_ = true;
    }
  }
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
    // Onto the header as on disk: header_ may name tables that are not written yet.
    Header h = disk_header_;
    h.incompatible |= kIncompatCorrupt;
    header_.incompatible |= kIncompatCorrupt;
    Status s = WriteHeader(h);
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
