// Qcow2Image: the guest data paths (read, write, zero, discard, flush, status).
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>

#include "qcow2/cluster_info.h"
#include "util/log.h"

namespace qcowfs::qcow2 {
namespace {

constexpr uint64_t kMaxReadChunk = 4ull << 20;

// Releases tracked host ranges when a request's I/O is over.
// The first few handles live inline: a request rarely has more, and a 4 KiB read then
// allocates nothing.
class InFlightRefs {
 public:
  explicit InFlightRefs(InFlightTable* t) : t_(t) {}
  InFlightRefs(const InFlightRefs&) = delete;
  InFlightRefs& operator=(const InFlightRefs&) = delete;
  ~InFlightRefs() {
    for (size_t i = 0; i < n_inline_; i++) t_->Release(inline_[i]);
    for (auto h : more_) t_->Release(h);
  }
  void Add(uint64_t start, uint64_t len) {
    InFlightTable::Handle h = t_->Register(start, len);
    if (n_inline_ < kInline)
      inline_[n_inline_++] = h;
    else
      more_.push_back(h);
  }

 private:
  static constexpr size_t kInline = 4;
  InFlightTable* t_;
  InFlightTable::Handle inline_[kInline];
  size_t n_inline_ = 0;
  std::vector<InFlightTable::Handle> more_;
};


}  // namespace

Status Qcow2Image::ReadBacking(uint64_t off, uint8_t* buf, uint64_t len) {
  uint64_t bsize = backing_ ? backing_->Size() : 0;
  uint64_t n = off < bsize ? std::min(len, bsize - off) : 0;
  if (n) RETURN_IF_ERROR(backing_->Read(off, buf, n));
  if (n < len) std::memset(buf + n, 0, len - n);
  return Status::Ok();
}

Status Qcow2Image::ReadCompressed(uint64_t entry, uint8_t* out) {
  const uint64_t cs = geo_.cluster_size;
  uint32_t x = geo_.csize_shift();
  uint64_t coff = entry & geo_.compressed_offset_mask();
  uint64_t nsec = ((entry >> x) & ((1ull << (62 - x)) - 1)) + 1;
  uint64_t clen = nsec * 512 - (coff & 511);
  std::vector<uint8_t> in(clen);
  RETURN_IF_ERROR(host_->Read(coff, in.data(), clen));
  if (compression_type_ == kCompressionZstd) {
    ZSTD_DCtx* dctx = ZSTD_createDCtx();
    if (!dctx) return Status::Error(ENOMEM, "zstd: out of memory");
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    ZSTD_outBuffer ob{out, cs, 0};
    size_t r = 0;
    while (ob.pos < ob.size && ib.pos < ib.size) {
      r = ZSTD_decompressStream(dctx, &ob, &ib);
      if (ZSTD_isError(r)) break;
      if (r == 0 && ob.pos < ob.size && ib.pos == ib.size) break;
    }
    ZSTD_freeDCtx(dctx);
    if (ZSTD_isError(r) || ob.pos != cs)
      return Status::Corruption(name_ + ": bad zstd compressed cluster at host offset " + std::to_string(coff));
    return Status::Ok();
  }
  z_stream z{};
  if (inflateInit2(&z, -12) != Z_OK) return Status::Error(ENOMEM, "zlib: init failed");
  z.next_in = in.data();
  z.avail_in = static_cast<uInt>(clen);
  z.next_out = out;
  z.avail_out = static_cast<uInt>(cs);
  int r = inflate(&z, Z_FINISH);
  inflateEnd(&z);
  if (!((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && z.avail_out == 0))
    return Status::Corruption(name_ + ": bad zlib compressed cluster at host offset " + std::to_string(coff));
  return Status::Ok();
}

Status Qcow2Image::ReadExtents(const std::vector<Extent>& ext, uint8_t* buf, uint64_t base) {
  std::vector<uint8_t> tmp;
  for (const Extent& e : ext) {
    uint8_t* dst = buf + (e.guest - base);
    switch (e.kind) {
      case Extent::kData: RETURN_IF_ERROR(data_->Read(e.host, dst, e.len)); break;
      case Extent::kZero: std::memset(dst, 0, e.len); break;
      case Extent::kInvalid: return InvalidEntry(e.guest / geo_.cluster_size, e.host != 0);
      case Extent::kBacking: RETURN_IF_ERROR(ReadBacking(e.guest, dst, e.len)); break;
      case Extent::kCompressed: {
        tmp.resize(geo_.cluster_size);
        RETURN_IF_ERROR(ReadCompressed(e.host, tmp.data()));
        std::memcpy(dst, tmp.data() + geo_.OffsetInCluster(e.guest), e.len);
        break;
      }
    }
  }
  return Status::Ok();
}

// Marks one guest cluster busy for the scope (meta_mu_ held exclusively throughout).
class Qcow2Image::GuestClusterLock {
 public:
  GuestClusterLock(Qcow2Image* img, uint64_t gc) NO_THREAD_SAFETY_ANALYSIS : img_(img), gc_(gc) {
    img_->LockGuest(gc_, gc_);
  }
  ~GuestClusterLock() NO_THREAD_SAFETY_ANALYSIS { img_->UnlockGuest(gc_, gc_); }

 private:
  Qcow2Image* img_;
  uint64_t gc_;
};

// Registers the host ranges a mapped request will touch (REQUIRES meta_mu_ held).
static void TrackExtents(const std::vector<Extent>& ext, bool data_file, const Geometry& g,
                         InFlightRefs* refs) {
  for (const Extent& e : ext) {
    if (e.kind == Extent::kData && !data_file) {
      refs->Add(e.host, e.len);
    } else if (e.kind == Extent::kCompressed) {
      uint32_t x = g.csize_shift();
      uint64_t coff = e.host & g.compressed_offset_mask();
      uint64_t nsec = ((e.host >> x) & ((1ull << (62 - x)) - 1)) + 1;
      refs->Add(coff, nsec * 512 - (coff & 511));
    }
  }
}

Status Qcow2Image::Read(uint64_t offset, void* buf, size_t len) {
  if (closed_) return Status::IoError(name_ + ": image is closed");
  if (offset > Size() || len > Size() - offset) return Status::Invalid(name_ + ": read beyond the end of the image");
  auto* out = static_cast<uint8_t*>(buf);
  uint64_t done = 0;
  // One extent list per call (not per chunk). No thread_local pool: a pool with a
  // destructor runs it at thread exit, and libfuse ends its workers with pthread_cancel,
  // whose forced unwind leaves ASan's stack shadow poisoned under that destructor.
  std::vector<Extent> ext;
  while (done < len) {
    ext.clear();
    InFlightRefs refs(&inflight_);
    uint64_t n;
    uint64_t want = std::min<uint64_t>(len - done, kMaxReadChunk);
    {
      ReaderLock lock(&meta_mu_);
      n = MapCached(offset + done, want, &ext);
      TrackExtents(ext, has_data_file_, geo_, &refs);
    }
    if (n == 0) {
      WriterLock lock(&meta_mu_);
      uint64_t l1i = (offset + done) / geo_.l2_span();
      RETURN_IF_ERROR(LoadL2(l1_[l1i] & kL1OffsetMask));
      continue;
    }
    RETURN_IF_ERROR(ReadExtents(ext, out + done, offset + done));
    done += n;
  }
  return Status::Ok();
}

Status Qcow2Image::Write(uint64_t offset, const void* buf, size_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (offset > Size() || len > Size() - offset) return Status::NoSpace(name_ + ": write beyond the end of the image");
  const auto* in = static_cast<const uint8_t*>(buf);
  const uint64_t cs = geo_.cluster_size;
  uint64_t done = 0;
  while (done < len) {
    uint64_t pos = offset + done;
    auto w = WriteInPlace(pos, in + done, len - done);
    Status s = w.status();
    if (s.ok() && w.value() > 0) {
      done += w.value();
      continue;
    }
    if (s.ok() && (pos & (cs - 1)) == 0 && len - done >= 2 * cs) {
      auto f = WriteFresh(pos, in + done, len - done);
      s = f.status();
      if (s.ok() && f.value() > 0) {
        done += f.value();
        continue;
      }
    }
    uint64_t n = std::min<uint64_t>(len - done, cs - (pos & (cs - 1)));
    if (s.ok()) s = WriteCluster(pos, in + done, n);
    if (!s.ok()) return s.is_corruption() ? MarkCorrupt(s.message()) : s;
    done += n;
  }
  return Status::Ok();
}

bool Qcow2Image::WritableInPlace(const ClusterInfo& ci, uint64_t in, uint64_t len, uint64_t sub) {
  if (ci.type != ClusterInfo::kNormal || !ci.copied || ci.bad_bitmap) return false;
  if (ci.nsub == 1) return ci.Sub(0) == SubState::kData;
  for (uint64_t s = in / sub; s <= (in + len - 1) / sub; s++)
    if (ci.Sub(static_cast<uint32_t>(s)) != SubState::kData) return false;
  return true;
}

Result<uint64_t> Qcow2Image::WriteInPlace(uint64_t off, const uint8_t* buf, uint64_t len) {
  const uint64_t cs = geo_.cluster_size;
  struct Run {
    uint64_t host, len;
  };
  constexpr size_t kMaxRuns = 16;  // one pwrite each; a fragmented write goes on in the next call
  Run runs[kMaxRuns];
  size_t nruns = 0;
  uint64_t done = 0;
  InFlightRefs refs(&inflight_);
  {
    ReaderLock lock(&meta_mu_);
    uint64_t cur_l1 = UINT64_MAX;
    const uint8_t* l2 = nullptr;
    while (done < len) {
      uint64_t pos = off + done;
      uint64_t gc = pos / cs, in = pos - gc * cs;
      uint64_t n = std::min(len - done, cs - in);
      uint64_t l1i = gc / geo_.l2_entries;
      if (l1i != cur_l1) {
        cur_l1 = l1i;
        bool unalloc = false;
        l2 = l1i < l1_.size() && (l1_[l1i] & kOflagCopied) ? CachedL2(l1i, &unalloc) : nullptr;
      }
      if (!l2) break;
      ClusterInfo ci = Decode(l2, gc);
      if (!WritableInPlace(ci, in, n, geo_.subcluster_size)) break;
      uint64_t host = ci.host + in;
      if (!has_data_file_) {
        Status s = CheckOverlap(host, n, "data");
        if (!s.ok()) {
          if (done == 0) return s;
          break;  // write what came before; the next call reports it
        }
      }
      if (nruns > 0 && runs[nruns - 1].host + runs[nruns - 1].len == host) {
        runs[nruns - 1].len += n;
      } else {
        if (nruns == kMaxRuns) break;
        runs[nruns++] = Run{host, n};
      }
      done += n;
    }
    // Registered while the mapping is held: a discard cannot free these
    // clusters for reuse until the data is written.
    if (!has_data_file_)
      for (size_t i = 0; i < nruns; i++) refs.Add(runs[i].host, runs[i].len);
  }
  uint64_t at = 0;
  for (size_t i = 0; i < nruns; i++) {
    RETURN_IF_ERROR(data_->Write(runs[i].host, buf + at, runs[i].len));
    at += runs[i].len;
  }
  return done;
}

Result<uint64_t> Qcow2Image::WriteFresh(uint64_t off, const uint8_t* buf, uint64_t len) {
  if (has_data_file_) return uint64_t{0};
  const uint64_t cs = geo_.cluster_size;
  const uint64_t gc = off / cs;
  const uint64_t l1i = gc / geo_.l2_entries, l2i = gc % geo_.l2_entries;
  // Whole clusters of the write, within this L2 table, at most 2 MiB (and 2 clusters).
  const uint64_t max_n = std::min({len / cs, geo_.l2_entries - l2i,
                                   std::max<uint64_t>(2, (uint64_t{2} << 20) / cs)});
  if (max_n < 2) return uint64_t{0};
  InFlightRefs refs(&inflight_);
  uint64_t n = 0, host = 0;
  meta_mu_.Lock();
  LockGuest(gc, gc + max_n - 1);
  Status ls;
  {
    auto t = L2ForWrite(l1i);
    if (t.ok()) {
      const uint8_t* l2 = t.value()->data.data();
      while (n < max_n) {
        ClusterInfo ci = Decode(l2, gc + n);
        // Unallocated or zero without a host cluster: nothing to copy, nothing to free.
        if (ci.type != ClusterInfo::kUnallocated || ci.bad_bitmap) break;
        n++;
      }
    } else {
      ls = t.status();
    }
  }
  if (!ls.ok() || n < 2) {
    UnlockGuest(gc, gc + max_n - 1);
    meta_mu_.Unlock();
    if (!ls.ok()) return ls;
    return uint64_t{0};
  }
  // Keep only the clusters this write takes busy (we hold meta_mu_ throughout, so no
  // waiter slips in between).
  UnlockGuest(gc, gc + max_n - 1);
  LockGuest(gc, gc + n - 1);
  {
    auto a = AllocClusters(n, false);
    if (!a.ok()) {
      UnlockGuest(gc, gc + n - 1);
      meta_mu_.Unlock();
      return a.status();
    }
    host = a.value();
  }
  Status s = CheckOverlap(host, n * cs, "data");
  if (!s.ok()) {
    UnallocClusters(host, n);
    UnlockGuest(gc, gc + n - 1);
    meta_mu_.Unlock();
    return s;
  }
  refs.Add(host, n * cs);
  meta_mu_.Unlock();

  Status st = data_->Write(host, buf, n * cs);

  // Link: the data is written; the flush orders it before the L2 tables.
  meta_mu_.Lock();
  if (st.ok()) {
    auto t = L2ForWrite(l1i);
    if (!t.ok()) {
      st = t.status();
    } else {
      TableCache::Entry* e = t.value();
      const uint64_t bitmap = geo_.extended_l2 ? (uint64_t{1} << kSubclusters) - 1 : 1;
      for (uint64_t i = 0; i < n; i++)
        Encode(e->data.data(), l2i + i, ((host + i * cs) & kL2OffsetMask) | kOflagCopied, bitmap);
      e->dirty = true;
      metadata_dirty_ = true;
    }
  }
  if (!st.ok()) UnallocClusters(host, n);  // no table points at them
  UnlockGuest(gc, gc + n - 1);
  meta_mu_.Unlock();
  if (!st.ok()) return st;
  return n * cs;
}

Status Qcow2Image::WriteDataFile(uint64_t off, const void* buf, size_t len) {
  return data_->Write(off, buf, len);
}

// Writes [off, off+len), which lies inside one guest cluster. buf == nullptr:
// preallocation, the cluster (if still unallocated) gets a host cluster holding
// what it reads now, built under the busy mark so no concurrent write is lost.
Status Qcow2Image::WriteCluster(uint64_t off, const uint8_t* buf, uint64_t len) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t sub = geo_.subcluster_size;
  const uint64_t gc = off / cs;
  const uint64_t l1i = gc / geo_.l2_entries, l2i = gc % geo_.l2_entries;
  const uint64_t in = off - gc * cs;
  const uint32_t s_first = static_cast<uint32_t>(in / sub), s_last = static_cast<uint32_t>((in + len - 1) / sub);
  auto in_place = [&](const ClusterInfo& ci) { return WritableInPlace(ci, in, len, sub); };
  // Fast path: an allocated cluster with refcount 1, under the shared lock.
  if (buf) {
    InFlightRefs refs(&inflight_);
    uint64_t host = 0;
    bool fast = false;
    {
      ReaderLock lock(&meta_mu_);
      bool unalloc = false;
      const uint8_t* l2 = (l1_[l1i] & kOflagCopied) ? CachedL2(l1i, &unalloc) : nullptr;
      if (l2) {
        ClusterInfo ci = Decode(l2, gc);
        if (in_place(ci)) {
          host = ci.host + in;
          if (!has_data_file_) {
            RETURN_IF_ERROR(CheckOverlap(host, len, "data"));
            refs.Add(host, len);
          }
          fast = true;
        }
      }
    }
    if (fast) return data_->Write(host, buf, len);
  }

  // Slow path: the L2 entry changes. Mark the guest cluster busy so overlapping
  // writers wait, decide under the exclusive lock, write data unlocked, link.
  InFlightRefs refs(&inflight_);
  ClusterInfo old;
  uint64_t host = 0;
  bool fresh = false;  // newly allocated here: given back if the write fails
  meta_mu_.Lock();
  LockGuest(gc, gc);
  {
    auto t = L2ForWrite(l1i);
    if (!t.ok()) return UnlockAndFail(gc, t.status());
    old = Decode(t.value()->data.data(), gc);
  }
  if (old.type == ClusterInfo::kInvalid || old.bad_bitmap) return UnlockAndFail(gc, InvalidEntry(gc, old.bad_bitmap));
  if (!buf && old.type != ClusterInfo::kUnallocated) return UnlockAndFail(gc, Status::Ok());
  if (buf && in_place(old)) {  // became allocated while we waited
    host = old.host + in;
    Status s = has_data_file_ ? Status::Ok() : CheckOverlap(host, len, "data");
    if (!s.ok()) return UnlockAndFail(gc, s);
    if (!has_data_file_) refs.Add(host, len);
    UnlockGuest(gc, gc);
    meta_mu_.Unlock();
    return data_->Write(host, buf, len);
  }
  if (has_data_file_) {
    host = gc * cs;
  } else if (old.type == ClusterInfo::kNormal && old.copied) {
    host = old.host;  // in place, but subclusters need allocating or zero-filling
  } else {
    auto a = AllocClusters(1, false);
    if (!a.ok()) return UnlockAndFail(gc, a.status());
    host = a.value();
    fresh = true;
  }
  if (!has_data_file_) {
    Status s = CheckOverlap(host, cs, "data");
    if (!s.ok()) return UnlockAndFail(gc, s);
    refs.Add(host, cs);
    if (old.type == ClusterInfo::kNormal && old.host != host) refs.Add(old.host, cs);
    if (old.type == ClusterInfo::kCompressed) TrackExtents({Extent{Extent::kCompressed, 0, 0, old.entry}}, false, geo_, &refs);
  }
  meta_mu_.Unlock();

  // Build the new contents subcluster by subcluster. Byte ranges to write:
  // new bytes of in-place data subclusters (never rewrite bytes we did not get,
  // a concurrent in-place writer may own them), whole subclusters otherwise.
  const uint32_t nsub = geo_.extended_l2 ? kSubclusters : 1;
  const bool replaced = host != old.host || old.type != ClusterInfo::kNormal;
  std::vector<uint8_t> cbuf(in == 0 && len == cs ? 0 : cs);
  std::vector<uint8_t> decompressed;
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  uint64_t new_bitmap = old.type == ClusterInfo::kCompressed ? 0 : old.bitmap;
  auto add_run = [&](uint64_t a, uint64_t b) {
    if (!runs.empty() && runs.back().second == a)
      runs.back().second = b;
    else
      runs.emplace_back(a, b);
  };
  Status st;
  auto fill_old = [&](uint32_t s, uint64_t from, uint64_t to) -> Status {
    // Old contents of cluster bytes [from, to) within subcluster s.
    if (from >= to) return Status::Ok();
    uint8_t* dst = cbuf.data() + from;
    if (old.type == ClusterInfo::kCompressed) {
      if (decompressed.empty()) {
        decompressed.resize(cs);
        RETURN_IF_ERROR(ReadCompressed(old.entry, decompressed.data()));
      }
      std::memcpy(dst, decompressed.data() + from, to - from);
      return Status::Ok();
    }
    switch (old.Sub(nsub == 1 ? 0 : s)) {
      case SubState::kData: return data_->Read(old.host + from, dst, to - from);
      case SubState::kZero: std::memset(dst, 0, to - from); return Status::Ok();
      case SubState::kUnalloc: return ReadBacking(gc * cs + from, dst, to - from);
    }
    return Status::Ok();
  };
  if (!buf) {
    // Preallocation: the whole cluster as it reads now.
    cbuf.resize(cs);
    for (uint32_t s = 0; s < nsub && st.ok(); s++) st = fill_old(s, s * sub, (s + 1) * sub);
    if (st.ok()) st = WriteDataFile(host, cbuf.data(), cs);
    new_bitmap = nsub == 1 ? 1 : (1ull << nsub) - 1;
  } else if (in == 0 && len == cs) {
    // The whole cluster is new: nothing to merge, write the caller's buffer.
    st = WriteDataFile(host, buf, cs);
    new_bitmap = nsub == 1 ? 1 : (1ull << nsub) - 1;  // all data, no zero bits
  }
  for (uint32_t s = 0; s < nsub && st.ok() && buf && !(in == 0 && len == cs); s++) {
    uint64_t sa = s * sub, sb = sa + sub;
    bool touched = s >= s_first && s <= s_last;
    SubState os = old.type == ClusterInfo::kCompressed ? SubState::kData : old.Sub(nsub == 1 ? 0 : s);
    bool written = false;
    if (touched) {
      uint64_t wa = std::max(sa, in), wb = std::min(sb, in + len);
      std::memcpy(cbuf.data() + wa, buf + (wa - in), wb - wa);
      if (os == SubState::kData && !replaced) {
        add_run(wa, wb);
      } else {
        st = fill_old(s, sa, wa);
        if (st.ok()) st = fill_old(s, wb, sb);
        add_run(sa, sb);
      }
      written = true;
    } else if (replaced && os == SubState::kData) {
      st = fill_old(s, sa, sb);  // moves to the new cluster
      add_run(sa, sb);
      written = true;
    }
    if (written) {
      new_bitmap |= 1ull << s;
      new_bitmap &= ~(1ull << (32 + s));
    }
  }
  for (size_t i = 0; i < runs.size() && st.ok(); i++)
    st = WriteDataFile(host + runs[i].first, cbuf.data() + runs[i].first, runs[i].second - runs[i].first);

  // Link: point the L2 entry at the data (data is written; the flush orders it).
  meta_mu_.Lock();
  if (st.ok()) {
    auto t = L2ForWrite(l1i);
    if (!t.ok()) {
      st = t.status();
    } else {
      TableCache::Entry* e = t.value();
      uint64_t entry = (host & kL2OffsetMask) | kOflagCopied;
      if (nsub == 1) new_bitmap = 1;  // standard entry: plain data
      Encode(e->data.data(), l2i, entry, new_bitmap);
      e->dirty = true;
      metadata_dirty_ = true;
      if (replaced && old.type != ClusterInfo::kUnallocated) FreeEntryLater(old.entry);
    }
  }
  if (!st.ok() && fresh) UnallocClusters(host, 1);  // no table points at it
  UnlockGuest(gc, gc);
  meta_mu_.Unlock();
  return st;
}

// Makes [cluster_off+in, +len) of one guest cluster read as zeros.
// discard: the caller wants space back (PUNCH_HOLE); may_unmap lets us free.
Status Qcow2Image::ZeroCluster(uint64_t cluster_off, uint64_t in, uint64_t len, bool may_unmap,
                               bool discard) {
  const uint64_t cs = geo_.cluster_size;
  const uint64_t sub = geo_.subcluster_size;
  const uint64_t gc = cluster_off / cs;
  const uint64_t l1i = gc / geo_.l2_entries, l2i = gc % geo_.l2_entries;
  const bool v3 = version_ >= 3;
  std::vector<std::pair<uint64_t, uint64_t>> pieces;  // zero data to write, in-cluster
  {
    WriterLock lock(&meta_mu_);
    GuestClusterLock busy(this, gc);
    // Nothing to do where the range already reads zeros without a backing file.
    if (!(l1_[l1i] & kL1OffsetMask) && !backing_ && !data_file_raw_) return Status::Ok();
    ASSIGN_OR_RETURN(TableCache::Entry * t, L2ForWrite(l1i));
    ClusterInfo ci = Decode(t->data.data(), gc);
    if (ci.type == ClusterInfo::kInvalid) return InvalidEntry(gc);
    if (data_file_raw_) {
      // The data file must stay a valid raw image: zero it there.
      RETURN_IF_ERROR(data_->WriteZeroes(gc * cs + in, len, may_unmap));
      if (ci.type != ClusterInfo::kNormal) {
        Encode(t->data.data(), l2i, (gc * cs) | kOflagCopied, geo_.extended_l2 ? kBitmapAllAlloc : 1);
        t->dirty = true;
        metadata_dirty_ = true;
      }
      return Status::Ok();
    }
    const bool whole = in == 0 && len == cs;
    if (whole) {
      if (!v3) {
        if (backing_) {
          pieces.emplace_back(0, cs);
        } else {
          Encode(t->data.data(), l2i, 0, 0);
          t->dirty = true;
          metadata_dirty_ = true;
          if (ci.type != ClusterInfo::kUnallocated) FreeEntryLater(ci.entry);
          if (has_data_file_ && ci.type == ClusterInfo::kNormal) (void)data_->Discard(gc * cs, cs);
        }
      } else {
        // Discarding what holds nothing and hides nothing is a no-op (as in QEMU, which
        // leaves an invalid bitmap there too).
        if (discard && !backing_ && ci.type == ClusterInfo::kUnallocated) return Status::Ok();
        bool keep = !may_unmap && ci.type == ClusterInfo::kNormal && ci.copied;
        if (keep) {  // preallocated zero cluster: allocation stays, reads zeros
          Encode(t->data.data(), l2i, ci.host | kOflagCopied, kBitmapAllZero);
        } else {
          bool hole = discard && !backing_;
          Encode(t->data.data(), l2i, 0, hole ? 0 : kBitmapAllZero);
          if (ci.type != ClusterInfo::kUnallocated) FreeEntryLater(ci.entry);
          if (has_data_file_ && ci.type == ClusterInfo::kNormal && may_unmap) (void)data_->Discard(gc * cs, cs);
        }
        t->dirty = true;
        metadata_dirty_ = true;
      }
    } else if (geo_.extended_l2 && v3 && ci.type != ClusterInfo::kCompressed &&
               (ci.type != ClusterInfo::kNormal || ci.copied) &&
               (in + sub - 1) / sub < (in + len) / sub) {
      // Whole subclusters get the zero bit; partial ones at the ends get zero data.
      uint64_t a = (in + sub - 1) / sub * sub, b = (in + len) / sub * sub;
      uint64_t bm = ci.bitmap;
      for (uint64_t s = a / sub; s < b / sub; s++) {
        bm &= ~(1ull << s);
        bm |= 1ull << (32 + s);
      }
      Encode(t->data.data(), l2i, ci.entry & ~kOflagZero, bm);
      t->dirty = true;
      metadata_dirty_ = true;
      if (in < a) pieces.emplace_back(in, a);
      if (b < in + len) pieces.emplace_back(b, in + len);
    } else {
      // Partial cluster: zero data, unless it already reads zeros.
      bool reads_zero = ci.type == ClusterInfo::kUnallocated && !ci.bad_bitmap && (!backing_ || ci.bitmap == (1ull << 32));
      if (!reads_zero) pieces.emplace_back(in, in + len);
    }
  }
  for (auto [a, b] : pieces) {
    std::vector<uint8_t> zeros(b - a, 0);
    RETURN_IF_ERROR(WriteCluster(cluster_off + a, zeros.data(), b - a));
  }
  return Status::Ok();
}
// Where nothing is allocated and nothing lies below, a range already reads zeros:
// returns the end of the run of whole unallocated L2 spans starting at pos (or pos).
uint64_t Qcow2Image::SkipUnallocatedSpans(uint64_t pos, uint64_t end) {
  if (backing_ || data_file_raw_) return pos;
  ReaderLock lock(&meta_mu_);
  const uint64_t span = geo_.l2_span();
  uint64_t p = pos;
  while (p < end && p % span == 0 && end - p >= span && !(l1_[p / span] & kL1OffsetMask)) p += span;
  return p;
}

// Zeroes (discard: punches) [offset, offset+len) cluster by cluster; when that freed
// clusters, flushes so the dropped references are durable and the space is given back.
Status Qcow2Image::ZeroRange(uint64_t offset, uint64_t len, bool may_unmap, bool discard) {
  const uint64_t cs = geo_.cluster_size;
  uint64_t done = 0;
  while (done < len) {
    uint64_t pos = offset + done;
    uint64_t skip = SkipUnallocatedSpans(pos, offset + len);
    if (skip > pos) {
      done = skip - offset;
      continue;
    }
    uint64_t in = pos & (cs - 1);
    uint64_t n = std::min<uint64_t>(len - done, cs - in);
    Status s = ZeroCluster(pos - in, in, n, may_unmap, discard);
    if (!s.ok()) return s.is_corruption() ? MarkCorrupt(s.message()) : s;
    done += n;
  }
  if (!may_unmap) return Status::Ok();
  WriterLock lock(&meta_mu_);
  return pending_free_.empty() ? Status::Ok() : FlushLocked();
}

Status Qcow2Image::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  RETURN_IF_ERROR(CheckWritable());
  if (offset > Size() || len > Size() - offset) return Status::NoSpace(name_ + ": beyond the end of the image");
  return ZeroRange(offset, len, may_unmap, false);
}

Status Qcow2Image::Discard(uint64_t offset, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (offset >= Size()) return Status::Ok();
  return ZeroRange(offset, std::min<uint64_t>(len, Size() - offset), true, true);
}

Status Qcow2Image::Allocate(uint64_t offset, uint64_t len) {
  RETURN_IF_ERROR(CheckWritable());
  if (offset > Size() || len > Size() - offset) return Status::NoSpace(name_ + ": beyond the end of the image");
  const uint64_t cs = geo_.cluster_size;
  for (uint64_t gc = offset / cs; gc * cs < offset + len; gc++) {
    const uint64_t l1i = gc / geo_.l2_entries, l2i = gc % geo_.l2_entries;
    bool copy_data = false;
    {
      WriterLock lock(&meta_mu_);
      GuestClusterLock busy(this, gc);
      ASSIGN_OR_RETURN(TableCache::Entry * t, L2ForWrite(l1i));
      ClusterInfo ci = Decode(t->data.data(), gc);
      if (ci.type == ClusterInfo::kInvalid || ci.bad_bitmap) return InvalidEntry(gc, ci.bad_bitmap);
      if (ci.type != ClusterInfo::kUnallocated) continue;
      bool reads_zero = ci.bitmap == (1ull << 32) || (geo_.extended_l2 && (ci.bitmap >> 32) == 0xffffffffu) || !backing_;
      if (!reads_zero || version_ < 3) {
        copy_data = true;  // allocate by writing what the cluster reads now
      } else {
        uint64_t host = gc * cs;
        if (!has_data_file_) {
          auto a = AllocClusters(1, false);
          if (!a.ok()) return a.status();
          host = a.value();
        }
        // Reserve the host range before the entry can reach the disk: an L2 entry
        // must never point past the end of the host file.
        Status r = data_->Allocate(host, cs);
        if (!r.ok()) {
          if (!has_data_file_) UnallocClusters(host, 1);
          return r;
        }
        Encode(t->data.data(), l2i, host | kOflagCopied, kBitmapAllZero);
        t->dirty = true;
        metadata_dirty_ = true;
      }
    }
    if (copy_data) {
      // Built and linked under the guest cluster's busy mark (a concurrent write to
      // the cluster waits, and is never overwritten by what was read before it).
      Status s = WriteCluster(gc * cs, nullptr, cs);
      if (!s.ok()) return s.is_corruption() ? MarkCorrupt(s.message()) : s;
    }
  }
  return Status::Ok();
}

void Qcow2Image::StartWriteback() {
  if (closed_ || read_only_) return;
  host_->StartWriteback();
  if (data_ != host_) data_->StartWriteback();
}

Status Qcow2Image::Flush() {
  if (closed_) return Status::IoError(name_ + ": image is closed");
  if (read_only_) return Status::Ok();
  WriterLock lock(&meta_mu_);
  return FlushLocked();
}

Result<block::BlockStatus> Qcow2Image::GetBlockStatus(uint64_t offset, uint64_t len) {
  return BlockStatusOf(offset, len, false);
}

Result<block::BlockStatus> Qcow2Image::GetTopBlockStatus(uint64_t offset, uint64_t len) {
  return BlockStatusOf(offset, len, true);
}

Result<block::BlockStatus> Qcow2Image::BlockStatusOf(uint64_t offset, uint64_t len, bool top_only) {
  if (offset >= Size()) return Status::Invalid(name_ + ": block status beyond the end");
  len = std::min<uint64_t>(len, Size() - offset);
  // One L2 table's span at most per call.
  len = std::min<uint64_t>(len, geo_.l2_span() - offset % geo_.l2_span());
  auto kind_of = [](Extent::Kind k) {
    switch (k) {
      case Extent::kData:
      case Extent::kCompressed: return block::ExtentType::kData;
      case Extent::kZero: return block::ExtentType::kZero;
      default: return block::ExtentType::kUnallocated;
    }
  };
  // Maps a window that grows (x4) until the first run ends inside it, so a call costs
  // about the length of the run it reports and a walk over a fragmented table stays
  // linear (mapping the whole rest of the table on every call would be quadratic).
  const uint64_t cs = geo_.cluster_size;
  uint64_t win = std::min<uint64_t>(len, 64 * cs - offset % cs);
  std::vector<Extent> ext;
  for (;;) {
    for (;;) {
      ext.clear();
      uint64_t n;
      {
        ReaderLock lock(&meta_mu_);
        n = MapCached(offset, win, &ext);
      }
      if (n > 0) break;
      WriterLock lock(&meta_mu_);
      RETURN_IF_ERROR(LoadL2(l1_[offset / geo_.l2_span()] & kL1OffsetMask));
    }
    const Extent& first = ext.front();
    // What a read there would fail with (EIO), never reported as zeros: a mirror copying
    // it must fail, not write zeros.
    if (first.kind == Extent::kInvalid) return InvalidEntry(first.guest / cs, first.host != 0);
    const bool backing = first.kind == Extent::kBacking;
    const block::ExtentType t = kind_of(first.kind);
    uint64_t n = 0;
    for (const Extent& e : ext) {
      if (backing ? e.kind != Extent::kBacking
                  : (kind_of(e.kind) != t || e.kind == Extent::kBacking || e.kind == Extent::kInvalid))
        break;
      n += e.len;
    }
    if (n == win && win < len) {
      win = std::min<uint64_t>(len, win * 4);
      continue;
    }
    if (!backing) return block::BlockStatus{t, n};
    // Unallocated here: the backing chain decides (past its end: zeros).
    uint64_t bsize = backing_->Size();
    if (top_only || offset >= bsize) return block::BlockStatus{block::ExtentType::kUnallocated, n};
    ASSIGN_OR_RETURN(auto bs, backing_->GetBlockStatus(offset, std::min(n, bsize - offset)));
    if (bs.type == block::ExtentType::kZero) bs.type = block::ExtentType::kUnallocated;
    return bs;
  }
}

}  // namespace qcowfs::qcow2
