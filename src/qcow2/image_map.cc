// Qcow2Image: L2 entry decoding, guest->host mapping, L2 tables for writing.
#include <cstring>

#include "qcow2/cluster_info.h"
#include "util/endian.h"

namespace qcowfs::qcow2 {

Qcow2Image::ClusterInfo Qcow2Image::Decode(const uint8_t* l2, uint64_t gc) const {
  ClusterInfo ci;
  const uint8_t* p = l2 + (gc % geo_.l2_entries) * geo_.l2_entry_size;
  ci.entry = LoadBE64(p);
  ci.nsub = geo_.extended_l2 ? kSubclusters : 1;
  if (ci.entry & kOflagCompressed) {
    // An external data file holds no compressed clusters.
    ci.type = has_data_file_ ? ClusterInfo::kInvalid : ClusterInfo::kCompressed;
    return ci;
  }
  ci.copied = (ci.entry & kOflagCopied) != 0;
  ci.host = ci.entry & kL2OffsetMask;
  bool allocated = ci.host != 0 || (has_data_file_ && ci.copied);
  ci.type = allocated ? ClusterInfo::kNormal : ClusterInfo::kUnallocated;
  // With a data file, the host offset is the guest offset (qcow2.txt, bit 2).
  if (allocated && has_data_file_ && ci.host != gc * geo_.cluster_size) ci.type = ClusterInfo::kInvalid;
  if (geo_.extended_l2) {
    ci.bitmap = LoadBE64(p + 8);
    // The bitmap of a compressed cluster is ignored on reads, as QEMU does.
    const uint64_t alloc = ci.bitmap & kBitmapAllAlloc, zero = ci.bitmap >> 32;
    ci.bad_bitmap = allocated ? (alloc & zero) != 0 : alloc != 0;
  } else if (ci.entry & kOflagZero && version_ >= 3) {
    ci.bitmap = 1ull << 32;
  } else {
    ci.bitmap = allocated ? 1 : 0;
  }
  return ci;
}

void Qcow2Image::Encode(uint8_t* l2, uint64_t index, uint64_t entry, uint64_t bitmap) const {
  uint8_t* p = l2 + index * geo_.l2_entry_size;
  if (geo_.extended_l2) {
    StoreBE64(p, entry);
    StoreBE64(p + 8, bitmap);
    return;
  }
  // Standard entry: the zero state is the zero flag; data needs no flag.
  if (bitmap & (1ull << 32)) entry |= kOflagZero;
  StoreBE64(p, entry);
}

const uint8_t* Qcow2Image::CachedL2(uint64_t l1_index, bool* unallocated) {
  *unallocated = false;
  uint64_t off = l1_[l1_index] & kL1OffsetMask;
  if (!off) {
    *unallocated = true;
    return nullptr;
  }
  TableCache::Entry* e = l2_cache_->Find(off);
  return e ? e->data.data() : nullptr;
}

Status Qcow2Image::LoadL2(uint64_t l2_offset) {
  if (l2_cache_->Find(l2_offset)) return Status::Ok();
  if (l2_offset % geo_.cluster_size || l2_offset < geo_.cluster_size)
    return Status::Corruption(name_ + ": L2 table offset " + std::to_string(l2_offset) + " is invalid");
  RETURN_IF_ERROR(EnsureCacheRoom(l2_cache_.get()));
  std::vector<uint8_t> data(geo_.cluster_size);
  RETURN_IF_ERROR(host_->Read(l2_offset, data.data(), data.size()));
  l2_cache_->Insert(l2_offset, std::move(data));
  return Status::Ok();
}

uint64_t Qcow2Image::MapCached(uint64_t off, uint64_t len, std::vector<Extent>* out) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t sub = geo_.subcluster_size;
  uint64_t done = 0;
  auto push = [&](Extent::Kind k, uint64_t g, uint64_t n, uint64_t host) {
    if (!out->empty()) {
      Extent& b = out->back();
      bool contiguous_host = (k != Extent::kData) || b.host + b.len == host;
      if (b.kind == k && k != Extent::kCompressed && k != Extent::kInvalid && b.guest + b.len == g && contiguous_host) {
        b.len += n;
        return;
      }
    }
    out->push_back(Extent{k, g, n, host});
  };
  const Extent::Kind hole = backing_ ? Extent::kBacking : Extent::kZero;
  while (done < len) {
    uint64_t pos = off + done;
    uint64_t gc = pos / cs;
    uint64_t l1i = gc / geo_.l2_entries;
    if (l1i >= l1_.size()) {  // beyond the L1 table (cannot happen below Size())
      push(Extent::kZero, pos, len - done, 0);
      return len;
    }
    bool unalloc = false;
    const uint8_t* l2 = CachedL2(l1i, &unalloc);
    if (unalloc) {
      uint64_t span_end = (l1i + 1) * geo_.l2_span();
      uint64_t n = std::min(len - done, span_end - pos);
      push(hole, pos, n, 0);
      done += n;
      continue;
    }
    if (!l2) return done;
    ClusterInfo ci = Decode(l2, gc);
    uint64_t in = pos - gc * cs;
    uint64_t cend = std::min(cs, in + (len - done));
    if (ci.type == ClusterInfo::kInvalid || ci.bad_bitmap) {
      push(Extent::kInvalid, pos, cend - in, ci.bad_bitmap);
      done += cend - in;
      continue;
    }
    if (ci.type == ClusterInfo::kCompressed) {
      push(Extent::kCompressed, pos, cend - in, ci.entry);
      done += cend - in;
      continue;
    }
    while (in < cend) {
      uint32_t s = static_cast<uint32_t>(in / sub);
      uint64_t n = std::min(cend, (s + 1) * sub) - in;
      switch (ci.Sub(ci.nsub == 1 ? 0 : s)) {
        case SubState::kData: push(Extent::kData, gc * cs + in, n, ci.host + in); break;
        case SubState::kZero: push(Extent::kZero, gc * cs + in, n, 0); break;
        case SubState::kUnalloc: push(hole, gc * cs + in, n, 0); break;
      }
      in += n;
      done += n;
    }
  }
  return done;
}

Status Qcow2Image::InvalidEntry(uint64_t gc, bool bad_bitmap) const {
  return Status::Corruption(name_ + ": L2 entry of guest offset " + std::to_string(gc * geo_.cluster_size) +
                            (bad_bitmap ? " has an invalid subcluster allocation bitmap (a subcluster both "
                                          "allocated and zero, or allocated in an unallocated cluster)"
                                        : " is invalid for an image with an external data file"));
}

Result<TableCache::Entry*> Qcow2Image::L2ForWrite(uint64_t l1_index) {
  const uint64_t cs = geo_.cluster_size;
  if (l1_index >= l1_.size()) return Status::Invalid(name_ + ": write beyond the L1 table");
  uint64_t l1e = l1_[l1_index];
  uint64_t off = l1e & kL1OffsetMask;
  if (off && (l1e & kOflagCopied)) {
    RETURN_IF_ERROR(LoadL2(off));
    return l2_cache_->Find(off);
  }
  // A new table, or a copy of one shared with a snapshot.
  std::vector<uint8_t> data(cs, 0);
  if (off) {
    RETURN_IF_ERROR(LoadL2(off));
    data = l2_cache_->Find(off)->data;
  }
  ASSIGN_OR_RETURN(uint64_t fresh, AllocClusters(1, true));
  RETURN_IF_ERROR(EnsureCacheRoom(l2_cache_.get()));
  TableCache::Entry* e = l2_cache_->Insert(fresh, std::move(data));
  e->dirty = true;
  l1_[l1_index] = fresh | kOflagCopied;
  l1_dirty_.insert(l1_index * 8 / cs);
  AddMeta(fresh, cs, "active L2 table");
  if (off) {
    RemoveMeta(off);
    FreeLater(off, 1);
  }
  metadata_dirty_ = true;
  return e;
}

}  // namespace qcowfs::qcow2
