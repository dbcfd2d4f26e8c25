// Qcow2Image: open, backing chain, snapshots, refcount rebuild, close.
#include <fcntl.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <cstring>

#include "qcow2/image.h"
#include "util/endian.h"
#include "util/log.h"

namespace qcowfs::qcow2 {
namespace {

std::string DirName(const std::string& path) {
  auto pos = path.rfind('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

std::string RealPath(const std::string& p) {
  char buf[PATH_MAX];
  if (realpath(p.c_str(), buf)) return buf;
  return p;
}

std::string Resolve(const std::string& dir, const std::string& name) {
  if (!name.empty() && name[0] == '/') return name;
  return dir + "/" + name;
}

}  // namespace

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::Open(const std::string& path,
                                                     const OpenOptions& opts) {
  std::set<std::string> chain;
  chain.insert(RealPath(path));
  auto lock = !opts.lock ? block::LockMode::kNone
                         : (opts.read_only ? block::LockMode::kShared : block::LockMode::kExclusive);
  ASSIGN_OR_RETURN(auto host, block::RawFileDevice::Open(path, opts.read_only, lock, opts.direct_io));
  std::unique_ptr<Qcow2Image> img(new Qcow2Image());
  OpenDevices devs;
  devs.host = host.get();
  devs.name = path;
  img->owned_host_ = std::move(host);
  if (Status s = img->Init(devs, opts, DirName(path), &chain); !s.ok()) {
    img->closed_ = true;  // a half-open image must not be flushed or touched
    return s;
  }
  return img;
}

Result<std::unique_ptr<Qcow2Image>> Qcow2Image::OpenOn(const OpenDevices& devs,
                                                       const OpenOptions& opts) {
  std::unique_ptr<Qcow2Image> img(new Qcow2Image());
  std::set<std::string> chain;
  if (Status s = img->Init(devs, opts, ".", &chain); !s.ok()) {
    img->closed_ = true;
    return s;
  }
  return img;
}

Qcow2Image::~Qcow2Image() {
  if (!closed_.load()) {
    Status s = Close();
    if (!s.ok()) QCOWFS_LOG(Error, "%s: close failed: %s", name_.c_str(), s.message().c_str());
  }
}

Status Qcow2Image::Init(const OpenDevices& devs, const OpenOptions& opts, const std::string& dir,
                        std::set<std::string>* chain) NO_THREAD_SAFETY_ANALYSIS {
  // Single-threaded until Init returns; the lock annotations are not needed here.
  opts_ = opts;
  name_ = devs.name;
  dir_ = dir;
  host_ = devs.host;
  read_only_ = opts.read_only || host_->read_only();
  uint64_t file_size = host_->Size();
  uint8_t probe[kHeaderProbeBytes] = {};
  if (file_size < kV2HeaderLength)
    return Status::Invalid(name_ + ": not a qcow2 image (file too short for a header)");
  RETURN_IF_ERROR(host_->Read(0, probe, sizeof(probe)));
  ASSIGN_OR_RETURN(uint32_t bits, ProbeClusterBits(probe, sizeof(probe), name_));
  uint64_t cs = 1ull << bits;
  cluster0_.assign(std::min<uint64_t>(cs, file_size), 0);
  RETURN_IF_ERROR(host_->Read(0, cluster0_.data(), cluster0_.size()));
  ASSIGN_OR_RETURN(header_, ParseHeader(cluster0_.data(), cluster0_.size(), file_size, name_));
  cluster0_.resize(cs, 0);
  disk_header_ = header_;
  if ((header_.incompatible & kIncompatCorrupt) && !read_only_)
    return Status::Invalid(name_ + ": image is marked corrupt; it can only be opened read-only (repair it with 'qemu-img check -r all')");
  geo_ = header_.geometry();
  size_ = header_.size;
  has_data_file_ = (header_.incompatible & kIncompatDataFile) != 0;
  data_file_raw_ = has_data_file_ && (header_.autoclear & kAutoclearDataFileRaw);
  lazy_refcounts_ = (header_.compatible & kCompatLazyRefcounts) != 0;
  version_ = header_.version;
  compression_type_ = header_.compression_type;
  dirty_bit_on_disk_ = (header_.incompatible & kIncompatDirty) != 0;
  corrupt_ = (header_.incompatible & kIncompatCorrupt) != 0;

  // L1 table.
  l1_.resize(header_.l1_size);
  if (header_.l1_size) {
    std::vector<uint8_t> raw(uint64_t{header_.l1_size} * 8);
    RETURN_IF_ERROR(host_->Read(header_.l1_table_offset, raw.data(), raw.size()));
    for (uint32_t i = 0; i < header_.l1_size; i++) {
      l1_[i] = LoadBE64(&raw[i * 8]);
      uint64_t off = l1_[i] & kL1OffsetMask;
      if (off && (off % cs || off < cs))
        return Status::Invalid(name_ + ": L1 entry " + std::to_string(i) + " has an invalid L2 table offset");
    }
  }
  // Refcount table.
  {
    uint64_t n = uint64_t{header_.refcount_table_clusters} * cs / 8;
    std::vector<uint8_t> raw(n * 8);
    RETURN_IF_ERROR(host_->Read(header_.refcount_table_offset, raw.data(), raw.size()));
    reftable_.resize(n);
    for (uint64_t i = 0; i < n; i++) {
      reftable_[i] = LoadBE64(&raw[i * 8]) & ~(cs - 1);
      if (reftable_[i] && reftable_[i] >= file_size)
        return Status::Invalid(name_ + ": refcount block " + std::to_string(i) + " lies beyond the end of the file");
    }
  }
  auto align = [&](uint64_t n) { return (n + cs - 1) & ~(cs - 1); };
  AddMeta(0, cs, "qcow2 header");
  if (header_.l1_size) AddMeta(header_.l1_table_offset, align(uint64_t{header_.l1_size} * 8), "active L1 table");
  AddMeta(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs, "refcount table");
  for (uint64_t rb : reftable_)
    if (rb) AddMeta(rb, cs, "refcount block");
  for (uint64_t e : l1_)
    if (e & kL1OffsetMask) AddMeta(e & kL1OffsetMask, cs, "active L2 table");
  RETURN_IF_ERROR(LoadSnapshots());

  size_t l2_tables = std::max<uint64_t>(4, opts.cache_size * 3 / 4 / cs);
  size_t rb_tables = std::max<uint64_t>(4, opts.cache_size / 4 / cs);
  l2_cache_ = std::make_unique<TableCache>(l2_tables, cs);
  rb_cache_ = std::make_unique<TableCache>(rb_tables, cs);

  // External data file.
  data_ = host_;
  if (has_data_file_) {
    if (devs.data_file) {
      data_ = devs.data_file;
    } else {
      std::string p = Resolve(dir, header_.data_file);
      auto lock = !opts.lock ? block::LockMode::kNone
                             : (read_only_ ? block::LockMode::kShared : block::LockMode::kExclusive);
      auto df = block::RawFileDevice::Open(p, read_only_, lock, opts.direct_io);
      if (!df.ok()) return Status::Error(df.status().err(), name_ + ": external data file: " + df.status().message());
      owned_data_ = std::move(df).value();
      data_ = owned_data_.get();
    }
  }
  // Backing chain.
  if (devs.backing) {
    backing_ = devs.backing;
    backing_desc_ = "(device)";
  } else if (!header_.backing_file.empty()) {
    if (data_file_raw_) return Status::Invalid(name_ + ": raw external data file with a backing file");
    RETURN_IF_ERROR(OpenBacking(dir, chain));
  }

  if (!read_only_) {
    if (header_.incompatible & kIncompatDirty) {
      QCOWFS_LOG(Warn, "%s: image was not closed cleanly; rebuilding refcounts", name_.c_str());
      uint64_t before = host_->Size();
      Status s = RebuildRefcounts();
      if (!s.ok()) {
        // Nothing of the new structure is in use while the header on disk still names
        // the old refcount table: take it back out of the file.
        uint8_t raw[8];
        if (host_->Read(48, raw, 8).ok() && LoadBE64(raw) < before && host_->Size() > before)
          (void)host_->Resize(before);
        if (s.err() == ENOSPC)
          return Status::NoSpace(name_ + ": not enough free space on the host to rebuild the refcounts of this "
                                         "image (lazy refcounts, not closed cleanly); free some space, or repair it "
                                         "with 'qemu-img check -r all'");
        return s;
      }
    }
    RETURN_IF_ERROR(ClearUnknownAutoclear());
  }
  return Status::Ok();
}

Status Qcow2Image::OpenBacking(const std::string& dir, std::set<std::string>* chain) {
  std::string p = Resolve(dir, header_.backing_file);
  std::string real = RealPath(p);
  if (chain->count(real))
    return Status::Invalid(name_ + ": backing chain has a loop (" + header_.backing_file + ")");
  if (static_cast<int>(chain->size()) > opts_.max_backing_depth)
    return Status::Invalid(name_ + ": backing chain is deeper than " + std::to_string(opts_.max_backing_depth));
  chain->insert(real);
  std::string fmt = header_.backing_format;
  auto lock = opts_.lock ? block::LockMode::kShared : block::LockMode::kNone;
  if (fmt.empty()) {
    auto probe = block::RawFileDevice::Open(p, true, block::LockMode::kNone, opts_.direct_io);
    if (!probe.ok()) return Status::Error(probe.status().err(), name_ + ": backing file: " + probe.status().message());
    uint8_t magic[4] = {};
    RETURN_IF_ERROR(probe.value()->Read(0, magic, 4));
    fmt = LoadBE32(magic) == kMagic ? "qcow2" : "raw";
  }
  if (fmt == "qcow2") {
    OpenOptions bo = opts_;
    bo.read_only = true;
    auto host = block::RawFileDevice::Open(p, true, lock, opts_.direct_io);
    if (!host.ok()) return Status::Error(host.status().err(), name_ + ": backing file: " + host.status().message());
    std::unique_ptr<Qcow2Image> img(new Qcow2Image());
    OpenDevices d;
    d.host = host.value().get();
    d.name = p;
    img->owned_host_ = std::move(host).value();
    Status s = img->Init(d, bo, p.rfind('/') == std::string::npos ? "." : p.substr(0, std::max<size_t>(1, p.rfind('/'))), chain);
    if (!s.ok()) {
      img->closed_ = true;
      return Status::Error(s.err(), name_ + ": backing file: " + s.message());
    }
    backing_desc_ = p + " (qcow2)";
    backing_path_ = p;
    owned_backing_ = std::move(img);
  } else if (fmt == "raw") {
    auto raw = block::RawFileDevice::Open(p, true, lock, opts_.direct_io);
    if (!raw.ok()) return Status::Error(raw.status().err(), name_ + ": backing file: " + raw.status().message());
    backing_desc_ = p + " (raw)";
    backing_path_ = p;
    owned_backing_ = std::move(raw).value();
  } else {
    return Status::Invalid(name_ + ": unsupported backing file format '" + fmt + "'");
  }
  backing_ = owned_backing_.get();
  return Status::Ok();
}

std::vector<std::string> Qcow2Image::BackingChain() const {
  std::vector<std::string> out;
  if (!backing_) return out;
  out.push_back(backing_desc_);
  if (auto* q = dynamic_cast<Qcow2Image*>(backing_)) {
    auto rest = q->BackingChain();
    out.insert(out.end(), rest.begin(), rest.end());
  }
  return out;
}

std::vector<std::string> Qcow2Image::BackingFiles() const {
  std::vector<std::string> out;
  if (!backing_path_.empty()) out.push_back(backing_path_);
  if (auto* q = dynamic_cast<Qcow2Image*>(backing_)) {
    auto rest = q->BackingFiles();
    out.insert(out.end(), rest.begin(), rest.end());
  }
  return out;
}

Status Qcow2Image::LoadSnapshots() NO_THREAD_SAFETY_ANALYSIS {
  if (header_.nb_snapshots == 0) return Status::Ok();
  const uint64_t cs = geo_.cluster_size;
  uint64_t file_size = host_->Size();
  uint64_t pos = header_.snapshots_offset;
  for (uint32_t i = 0; i < header_.nb_snapshots; i++) {
    uint8_t h[40];
    if (pos + 40 > file_size) return Status::Invalid(name_ + ": snapshot table runs past the end of the file");
    RETURN_IF_ERROR(host_->Read(pos, h, sizeof(h)));
    uint64_t l1_off = LoadBE64(h);
    uint32_t l1_size = LoadBE32(h + 8);
    uint16_t id_len = LoadBE16(h + 12);
    uint16_t name_len = LoadBE16(h + 14);
    uint32_t extra = LoadBE32(h + 36);
    if (extra > 1024) return Status::Invalid(name_ + ": snapshot " + std::to_string(i) + " has an oversized extra data field");
    if (l1_off % cs || uint64_t{l1_size} * 8 > kMaxL1Bytes || (l1_size && l1_off + uint64_t{l1_size} * 8 > file_size))
      return Status::Invalid(name_ + ": snapshot " + std::to_string(i) + " has an invalid L1 table");
    snapshot_l1s_.emplace_back(l1_off, l1_size);
    SnapshotInfo info;
    info.date_sec = LoadBE32(h + 16);
    info.vm_clock_ns = LoadBE64(h + 24);
    info.vm_state_size = LoadBE32(h + 32);
    std::vector<uint8_t> rest(extra + id_len + name_len);
    RETURN_IF_ERROR(host_->Read(pos + 40, rest.data(), rest.size()));
    if (extra >= 8) info.vm_state_size = LoadBE64(rest.data());
    if (extra >= 16) info.disk_size = LoadBE64(rest.data() + 8);
    info.id.assign(reinterpret_cast<char*>(rest.data()) + extra, id_len);
    info.name.assign(reinterpret_cast<char*>(rest.data()) + extra + id_len, name_len);
    snapshots_.push_back(std::move(info));
    pos += (40 + extra + id_len + name_len + 7) & ~7ull;
  }
  uint64_t table_len = pos - header_.snapshots_offset;
  AddMeta(header_.snapshots_offset, (table_len + cs - 1) & ~(cs - 1), "snapshot table");
  for (auto [off, n] : snapshot_l1s_)
    if (n) AddMeta(off, (uint64_t{n} * 8 + cs - 1) & ~(cs - 1), "inactive L1 table");
  return Status::Ok();
}

Status Qcow2Image::ClearUnknownAutoclear() NO_THREAD_SAFETY_ANALYSIS {
  if (header_.version < 3) return Status::Ok();
  uint64_t keep = header_.autoclear & kAutoclearKnownMask;
  if (keep == header_.autoclear) return Status::Ok();
  header_.autoclear = keep;
  return WriteHeaderSync();
}

// Counts the references to each host cluster: the header, the L1 and L2 tables
// (active and snapshots), data and compressed clusters, the snapshot table and,
// with with_refcounts, the refcount table and blocks. Active L2 tables are read
// through the cache (its copy is the newest). A reference past the end of the file
// is corruption, or with `beyond` counted there (only clusters below `limit`; an L2
// table past the end is not read).
Status Qcow2Image::CountReferences(bool with_refcounts, std::vector<uint64_t>* counts,
                                   std::map<uint64_t, uint64_t>* beyond, uint64_t limit) {
  const uint64_t cs = geo_.cluster_size;
  uint64_t file_size = host_->Size();
  counts->assign((file_size + cs - 1) / cs + 1, 0);
  auto past_end = [&](uint64_t off, uint64_t len) { return off > file_size + cs || len > file_size + cs - off; };
  auto add = [&](uint64_t off, uint64_t len) -> Status {
    if (past_end(off, len)) {
      if (!beyond)
        return Status::Corruption(name_ + ": metadata points beyond the end of the file (offset " + std::to_string(off) + ")");
      const uint64_t end = len > UINT64_MAX - off ? UINT64_MAX : off + len;
      for (uint64_t c = off / cs; c * cs < std::min(end, limit); c++) {
        if (c < counts->size())
          (*counts)[c]++;
        else
          (*beyond)[c]++;
      }
      return Status::Ok();
    }
    for (uint64_t c = off / cs; c <= (off + len - 1) / cs; c++) (*counts)[c]++;
    return Status::Ok();
  };
  RETURN_IF_ERROR(add(0, cs));
  std::vector<uint8_t> l2(cs);
  TableCache* l2_cache = l2_cache_.get();  // (the lambda runs under the caller's lock)
  auto walk = [&](uint64_t l1_off, uint64_t l1_size, const std::vector<uint64_t>* mem) -> Status {
    if (l1_size == 0) return Status::Ok();
    RETURN_IF_ERROR(add(l1_off, l1_size * 8));
    std::vector<uint64_t> l1(l1_size);
    if (mem) {
      l1 = *mem;
    } else {
      if (past_end(l1_off, l1_size * 8)) return Status::Ok();
      std::vector<uint8_t> raw(l1_size * 8);
      RETURN_IF_ERROR(host_->Read(l1_off, raw.data(), raw.size()));
      for (uint64_t i = 0; i < l1_size; i++) l1[i] = LoadBE64(&raw[i * 8]);
    }
    for (uint64_t e : l1) {
      uint64_t l2off = e & kL1OffsetMask;
      if (!l2off) continue;
      RETURN_IF_ERROR(add(l2off, cs));
      if (past_end(l2off, cs)) continue;
      const uint8_t* table = l2.data();
      if (const TableCache::Entry* c = l2_cache->Find(l2off)) {
        table = c->data.data();
      } else {
        RETURN_IF_ERROR(host_->Read(l2off, l2.data(), cs));
      }
      for (uint64_t j = 0; j < geo_.l2_entries; j++) {
        uint64_t ent = LoadBE64(&table[j * geo_.l2_entry_size]);
        if (ent & kOflagCompressed) {
          uint32_t x = geo_.csize_shift();
          uint64_t coff = ent & geo_.compressed_offset_mask();
          uint64_t nsec = ((ent >> x) & ((1ull << (62 - x)) - 1)) + 1;
          uint64_t end = (coff & ~511ull) + nsec * 512;
          RETURN_IF_ERROR(add(coff, end - coff));
        } else if ((ent & kL2OffsetMask) && !has_data_file_) {
          RETURN_IF_ERROR(add(ent & kL2OffsetMask, cs));
        }
      }
    }
    return Status::Ok();
  };
  RETURN_IF_ERROR(walk(header_.l1_table_offset, l1_.size(), &l1_));
  for (auto [off, n] : snapshot_l1s_) RETURN_IF_ERROR(walk(off, n, nullptr));
  if (header_.nb_snapshots) {
    auto it = meta_regions_.find(header_.snapshots_offset);
    if (it != meta_regions_.end()) RETURN_IF_ERROR(add(it->first, it->second.first - it->first));
  }
  if (with_refcounts) {
    RETURN_IF_ERROR(add(header_.refcount_table_offset, uint64_t{header_.refcount_table_clusters} * cs));
    for (uint64_t rb : reftable_)
      if (rb) RETURN_IF_ERROR(add(rb, cs));
  }
  return Status::Ok();
}

Status Qcow2Image::CheckRefcounts(uint64_t limit) {
  WriterLock lock(&meta_mu_);
  std::vector<uint64_t> counts;
  std::map<uint64_t, uint64_t> beyond;
  RETURN_IF_ERROR(CountReferences(true, &counts, &beyond, limit));
  auto undercount = [&](uint64_t c, uint64_t refs, uint64_t rc) {
    return Status::Corruption(name_ + ": host cluster at offset " + std::to_string(c * geo_.cluster_size) +
                              (c < counts.size() ? "" : " (past the end of the file)") + " is referenced " +
                              std::to_string(refs) + " times but its refcount is " + std::to_string(rc) +
                              " (run 'qemu-img check -r all')");
  };
  for (uint64_t c = 0; c < counts.size() && c * geo_.cluster_size < limit; c++) {
    if (!counts[c]) continue;
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcountLocked(c));
    if (rc < counts[c]) return undercount(c, counts[c], rc);
  }
  for (auto [c, refs] : beyond) {  // all below limit (CountReferences)
    ASSIGN_OR_RETURN(uint64_t rc, GetRefcountLocked(c));
    if (rc < refs) return undercount(c, refs, rc);
  }
  return Status::Ok();
}

// Recomputes every refcount from the L1/L2 tables (after a crash with lazy
// refcounts) and writes a fresh refcount structure past the end of the file.
// The header switches to it in one synced write, which also clears the dirty bit and
// the autoclear bits we do not keep; the old structure is then free.
Status Qcow2Image::RebuildRefcounts() {
  WriterLock lock(&meta_mu_);
  const uint64_t cs = geo_.cluster_size;
  std::vector<uint64_t> counts;
  RETURN_IF_ERROR(CountReferences(false, &counts, nullptr, UINT64_MAX));
  // Size the new structure so that it also counts itself.
  const uint64_t base = counts.size();
  uint64_t nrb = 0, nrt = 0;
  for (;;) {
    uint64_t total = base + nrb + nrt;
    uint64_t rb = (total + geo_.refblock_entries - 1) / geo_.refblock_entries;
    uint64_t rt = (rb * 8 + cs - 1) / cs;
    if (rb == nrb && rt == nrt) break;
    nrb = rb;
    nrt = rt;
  }
  counts.resize(base + nrb + nrt, 0);
  for (uint64_t i = base; i < base + nrb + nrt; i++) counts[i] = 1;
  std::vector<uint8_t> block(cs);
  std::vector<uint8_t> table(nrt * cs, 0);
  for (uint64_t b = 0; b < nrb; b++) {
    std::fill(block.begin(), block.end(), 0);
    for (uint64_t i = 0; i < geo_.refblock_entries; i++) {
      uint64_t c = b * geo_.refblock_entries + i;
      if (c >= counts.size()) break;
      if (counts[c] > geo_.max_refcount())
        return Status::Corruption(name_ + ": refcount of cluster " + std::to_string(c) + " overflows refcount_bits");
      SetRefcount(block.data(), i, geo_.refcount_order, counts[c]);
    }
    RETURN_IF_ERROR(host_->Write((base + b) * cs, block.data(), cs));
    StoreBE64(&table[b * 8], (base + b) * cs);
  }
  RETURN_IF_ERROR(host_->Write((base + nrb) * cs, table.data(), table.size()));
  RETURN_IF_ERROR(host_->Flush());
  // Switch to the new structure.
  for (uint64_t rb : reftable_)
    if (rb) RemoveMeta(rb);
  RemoveMeta(header_.refcount_table_offset);
  header_.refcount_table_offset = (base + nrb) * cs;
  header_.refcount_table_clusters = static_cast<uint32_t>(nrt);
  header_.incompatible &= ~kIncompatDirty;
  // The count above knows nothing of structures behind autoclear bits (persistent
  // bitmaps): their clusters now have refcount 0. The same header write declares them
  // invalid, so that no crash leaves a header that still uses them (qemu-img check would
  // report every such cluster); ClearUnknownAutoclear then has nothing left to do.
  if (header_.version >= 3) header_.autoclear &= kAutoclearKnownMask;
  RETURN_IF_ERROR(WriteHeaderSync());
  dirty_bit_on_disk_ = false;
  reftable_.assign(nrt * cs / 8, 0);
  for (uint64_t b = 0; b < nrb; b++) {
    reftable_[b] = (base + b) * cs;
    AddMeta((base + b) * cs, cs, "refcount block");
  }
  AddMeta(header_.refcount_table_offset, nrt * cs, "refcount table");
  rb_cache_->Clear();
  free_hint_ = 0;
  return Status::Ok();
}

Status Qcow2Image::Close() {
  if (closed_.exchange(true)) return Status::Ok();
  if (read_only_) return Status::Ok();
  WriterLock lock(&meta_mu_);
  if (corrupt_) return FlushLocked();  // fails if metadata could not be written
  RETURN_IF_ERROR(FlushLocked());
  // Frees applied by the flush left refblocks dirty: write them too.
  RETURN_IF_ERROR(FlushLocked());
  if (header_.incompatible & kIncompatDirty) {
    header_.incompatible &= ~kIncompatDirty;
    RETURN_IF_ERROR(WriteHeaderSync());
    dirty_bit_on_disk_ = false;
  }
  return Status::Ok();
}

uint64_t Qcow2Image::AllocatedBytes() const {
  uint64_t n = host_->AllocatedBytes();
  if (data_ != host_) n += data_->AllocatedBytes();
  return n;
}

ImageStats Qcow2Image::Stats() {
  ReaderLock lock(&meta_mu_);
  return ImageStats{l2_cache_->hits(), l2_cache_->misses(), rb_cache_->hits(), rb_cache_->misses(),
                    inflight_.size()};
}

}  // namespace qcowfs::qcow2
