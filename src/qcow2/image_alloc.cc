// Qcow2Image: refcounts, cluster allocation, deferred frees, cache room.
#include <algorithm>

#include "qcow2/cluster_info.h"
#include "util/log.h"

namespace qcowfs::qcow2 {

Status Qcow2Image::EnsureCacheRoom(TableCache* cache) {
  while (cache->full()) {
    TableCache::Entry* v = cache->Victim();
    if (v->dirty) {
      Status s;
      if (cache == l2_cache_.get()) {
        // An L2 table may reach the disk only after the data and refcounts it
        // depends on: run the ordered flush, which cleans every L2 table.
        s = FlushLocked();
      } else {
        // Refcount blocks may be written at any time (increments first is safe;
        // decrements are applied only after the dropping L2 is durable).
        s = host_->Write(v->offset, v->data.data(), v->data.size());
        if (s.ok()) v->dirty = false;
      }
      if (!s.ok()) {
        // The host cannot take metadata now (full, failing): evict a clean table if
        // there is one, or let the cache run over its size until a flush succeeds.
        // The request that needed room must not fail for it (a read never does).
        TableCache::Entry* clean = nullptr;
        cache->ForEach([&](TableCache::Entry* e) {
          if (!e->dirty && (!clean || e->last_use.load() < clean->last_use.load())) clean = e;
        });
        if (clean) cache->Erase(clean->offset);
        QCOWFS_LOG(Warn, "%s: metadata cache over its size: %s", name_.c_str(), s.message().c_str());
        return Status::Ok();
      }
    }
    if (cache->full()) cache->Erase(cache->Victim()->offset);
  }
  return Status::Ok();
}

Result<TableCache::Entry*> Qcow2Image::Refblock(uint64_t block_index, bool create) {
  const uint64_t cs = geo_.cluster_size;
  uint64_t off = block_index < reftable_.size() ? reftable_[block_index] : 0;
  if (off) {
    if (TableCache::Entry* e = rb_cache_->Find(off)) return e;
    RETURN_IF_ERROR(EnsureCacheRoom(rb_cache_.get()));
    std::vector<uint8_t> data(cs);
    RETURN_IF_ERROR(host_->Read(off, data.data(), cs));
    return rb_cache_->Insert(off, std::move(data));
  }
  if (!create) return static_cast<TableCache::Entry*>(nullptr);
  return Status::Invalid(name_ + ": internal error: refcount block missing");
}

Result<uint64_t> Qcow2Image::GetRefcountLocked(uint64_t cluster) {
  ASSIGN_OR_RETURN(TableCache::Entry * e, Refblock(cluster / geo_.refblock_entries, false));
  if (!e) return uint64_t{0};
  return GetRefcount(e->data.data(), cluster % geo_.refblock_entries, geo_.refcount_order);
}

Status Qcow2Image::UpdateRefcount(uint64_t cluster, int64_t delta) {
  ASSIGN_OR_RETURN(TableCache::Entry * e, Refblock(cluster / geo_.refblock_entries, true));
  uint64_t idx = cluster % geo_.refblock_entries;
  uint64_t v = GetRefcount(e->data.data(), idx, geo_.refcount_order);
  if (delta < 0 && v < static_cast<uint64_t>(-delta))
    return Status::Corruption(name_ + ": refcount of cluster " + std::to_string(cluster) + " would drop below zero");
  if (delta > 0 && geo_.max_refcount() - v < static_cast<uint64_t>(delta))
    return Status::Error(EMLINK, name_ + ": refcount of cluster " + std::to_string(cluster) + " would overflow refcount_bits");
  v += delta;
  SetRefcount(e->data.data(), idx, geo_.refcount_order, v);
  e->dirty = true;
  metadata_dirty_ = true;
  if (v == 0 && cluster < free_hint_) free_hint_ = cluster;
  return Status::Ok();
}

// A cluster with refcount 0 that holds live metadata means the refcounts are corrupt:
// handing it out would overwrite a table, so the allocation fails (and the caller
// marks the image corrupt) instead.
Status Qcow2Image::CheckFreeIsNotMeta(uint64_t cluster) {
  const char* meta = MetaAt(cluster * geo_.cluster_size, geo_.cluster_size);
  if (!meta) return Status::Ok();
  return Status::Corruption(name_ + ": host cluster at offset " + std::to_string(cluster * geo_.cluster_size) +
                            " has refcount 0 but holds the " + meta + " (run 'qemu-img check -r all')");
}

// Finds n contiguous free clusters, makes sure refcount blocks cover them (new
// blocks describe themselves: they sit inside the range they count), and takes
// a reference on each. A cluster is free when its refcount is 0 and no tracked
// request overlaps it. Everything is chosen first, then host space is reserved
// for the new refcount blocks (and, with reserve, for the clusters), and only
// then does anything change: a full host fails the allocation with nothing done.
Result<uint64_t> Qcow2Image::AllocClusters(uint64_t n, bool reserve) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t per = geo_.refblock_entries;
  HostRangeSet busy(opts_.unsafe_ignore_inflight ? std::vector<HostRange>{} : inflight_.Snapshot());
  uint64_t c = free_hint_ ? free_hint_ : 1;
  uint64_t start = 0, run = 0;
  bool hint_moved = false;
  while (run < n) {
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcountLocked(c));
    bool free = rc == 0 && !busy.Overlaps(c * cs, cs);
    if (free) RETURN_IF_ERROR(CheckFreeIsNotMeta(c));
    if (rc == 0 && !hint_moved) {
      free_hint_ = c;
      hint_moved = true;
    }
    if (free) {
      if (run == 0) start = c;
      run++;
    } else {
      run = 0;
    }
    c++;
    if (c > (1ull << (56 - geo_.cluster_bits)))
      return Status::NoSpace(name_ + ": host offset space exhausted");
  }
  // Refcount blocks for [start, start+n). A missing block goes into its own range,
  // outside the clusters being allocated, and counts itself. A block the allocation
  // covers entirely goes past the allocation, after any block placed there before; if
  // that spot's own block is missing too, the loop places it as well. Blocks placed
  // outside their range are counted once every block exists.
  struct NewBlock {
    uint64_t index, cluster;
    bool self;
  };
  std::vector<NewBlock> blocks;
  auto planned = [&](uint64_t x) {
    for (const NewBlock& nb : blocks)
      if (nb.cluster == x) return true;
    return false;
  };
  uint64_t next_outside = start + n;
  uint64_t last_block = (start + n - 1) / per;
  for (uint64_t b = start / per; b <= last_block; b++) {
    if (b < reftable_.size() && reftable_[b]) continue;
    uint64_t lo = b * per, hi = lo + per;
    uint64_t pick = 0;
    for (uint64_t x = std::max<uint64_t>(lo, 1); x < hi; x++) {
      if ((x >= start && x < start + n) || busy.Overlaps(x * cs, cs) || MetaAt(x * cs, cs) || planned(x)) continue;
      pick = x;
      break;
    }
    const bool self = pick != 0;
    if (!self) {
      for (;;) {
        ASSIGN_OR_RETURN(uint64_t rc, GetRefcountLocked(next_outside));
        if (rc == 0 && !busy.Overlaps(next_outside * cs, cs) && !MetaAt(next_outside * cs, cs) &&
            !planned(next_outside))
          break;
        next_outside++;
      }
      pick = next_outside++;
      last_block = std::max(last_block, pick / per);
    }
    if (b >= kMaxRefcountTableBytes / 8) {
      // QEMU opens no image with a larger refcount table (QCOW_MAX_REFTABLE_SIZE); nothing
      // has changed yet.
      return Status::NoSpace(name_ + ": no room for more host clusters: the refcount table would grow past 8 MiB");
    }
    blocks.push_back(NewBlock{b, pick, self});
  }
  if (reserve) RETURN_IF_ERROR(ReserveHost(start * cs, n * cs));
  for (const NewBlock& nb : blocks) RETURN_IF_ERROR(ReserveHost(nb.cluster * cs, cs));
  for (const NewBlock& nb : blocks) {
    if (nb.index >= reftable_.size())
      reftable_.resize(std::min(kMaxRefcountTableBytes / 8, std::max<uint64_t>(nb.index + 1, reftable_.size() * 2)), 0);
    RETURN_IF_ERROR(EnsureCacheRoom(rb_cache_.get()));
    TableCache::Entry* e = rb_cache_->Insert(nb.cluster * cs, std::vector<uint8_t>(cs, 0));
    e->dirty = true;
    reftable_[nb.index] = nb.cluster * cs;
    reftable_dirty_.insert(nb.index * 8 / cs);
    AddMeta(nb.cluster * cs, cs, "refcount block");
    metadata_dirty_ = true;
    if (nb.self) RETURN_IF_ERROR(UpdateRefcount(nb.cluster, 1));
  }
  for (const NewBlock& nb : blocks)
    if (!nb.self) RETURN_IF_ERROR(UpdateRefcount(nb.cluster, 1));
  for (uint64_t i = 0; i < n; i++) RETURN_IF_ERROR(UpdateRefcount(start + i, 1));
  if (free_hint_ == start) free_hint_ = start + n;
  return start * cs;
}

// Host space for clusters about to hold metadata. ENOSPC names the image.
Status Qcow2Image::ReserveHost(uint64_t off, uint64_t len) {
  Status s = host_->Allocate(off, len);
  if (s.ok()) return s;
  if (s.err() == ENOSPC) return Status::NoSpace(name_ + ": no space left on the host for metadata");
  return s;
}

void Qcow2Image::UnallocClusters(uint64_t host_off, uint64_t n) {
  const uint64_t cs = geo_.cluster_size;
  for (uint64_t c = host_off / cs; c < host_off / cs + n; c++) {
    Status s = UpdateRefcount(c, -1);
    if (!s.ok()) {
      QCOWFS_LOG(Warn, "%s: %s", name_.c_str(), s.message().c_str());
      continue;
    }
    // Under meta_mu_, before anyone can allocate it again: give back what a failed
    // write may have taken.
    if (opts_.discard_unmap) (void)host_->Discard(c * cs, cs);
  }
}

void Qcow2Image::FreeLater(uint64_t host_off, uint64_t nclusters) {
  pending_free_.emplace_back(host_off / geo_.cluster_size, nclusters);
  metadata_dirty_ = true;
}

void Qcow2Image::FreeEntryLater(uint64_t entry) {
  if (entry & kOflagCompressed) {
    uint32_t x = geo_.csize_shift();
    uint64_t coff = entry & geo_.compressed_offset_mask();
    uint64_t nsec = ((entry >> x) & ((1ull << (62 - x)) - 1)) + 1;
    uint64_t end = (coff & ~511ull) + nsec * 512;
    uint64_t first = coff / geo_.cluster_size, last = (end - 1) / geo_.cluster_size;
    pending_free_.emplace_back(first, last - first + 1);
  } else if (entry & kL2OffsetMask) {
    if (has_data_file_) return;  // data-file clusters are not refcounted
    pending_free_.emplace_back((entry & kL2OffsetMask) / geo_.cluster_size, 1);
  }
  metadata_dirty_ = true;
}

// REQUIRES: every reference dropped for pending_free_ is on disk (end of flush).
Status Qcow2Image::ApplyPendingFrees() {
  const uint64_t cs = geo_.cluster_size;
  std::vector<std::pair<uint64_t, uint64_t>> todo;
  todo.swap(pending_free_);
  Status first;
  for (auto [c0, n] : todo) {
    for (uint64_t c = c0; c < c0 + n; c++) {
      Status s = UpdateRefcount(c, -1);
      if (!s.ok()) {
        if (first.ok()) first = s;
        continue;
      }
      auto rc = GetRefcountLocked(c);
      if (rc.ok() && rc.value() == 0) l2_cache_->Erase(c * cs);  // never write a freed table
      if (rc.ok() && rc.value() == 0 && opts_.discard_unmap) {
        // Before the cluster can be allocated again (we hold meta_mu_), so a late
        // punch can never erase new contents.
        Status d = host_->Discard(c * cs, cs);
        if (!d.ok()) QCOWFS_LOG(Warn, "%s: punch hole at 0x%llx failed: %s", name_.c_str(),
                                static_cast<unsigned long long>(c * cs), d.message().c_str());
      }
    }
  }
  return first;
}

}  // namespace qcowfs::qcow2
