// Qcow2Image: a qcow2 image as a BlockDevice, on top of a host BlockDevice.
//
// Concurrency (SPEC §5). meta_mu_ (a reader/writer lock) guards all metadata:
// header, L1 table, L2 and refcount-block caches, the allocator, the busy guest
// ranges. Lookups that hit the cache run under the shared lock; allocation, cache
// misses, discard and flush take it exclusively. Data I/O never runs under it.
// Every read and write registers the host ranges it touches in inflight_ before
// meta_mu_ drops; the allocator skips refcount-0 clusters that a live request still
// overlaps. Writes that change an L2 entry first mark the guest cluster busy
// (busy_), so overlapping allocating writes wait and never allocate twice.
// Lock order: meta_mu_ -> an InFlightTable shard mutex (leaf, one at a time).
//
// On-disk write ordering (crash safety; leaks allowed, never corruption): see
// ARCHITECTURE.md. In short, FlushLocked makes each step durable before the next:
// data; refcount blocks; refcount-table entries of new blocks (after a relocation the
// new table, then a header naming it); L2 tables; L1; header; then pending frees are
// applied (a dropped reference is durable before its cluster can be reused). Tables
// are marked clean only after their sync; a failed host sync is sticky. Metadata
// clusters reserve host space before anything changes, so a full host never leaves a
// table that cannot be written.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "block/block_device.h"
#include "block/raw_file_device.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/inflight.h"
#include "qcow2/table_cache.h"
#include "util/mutex.h"
#include "util/thread_annotations.h"

namespace qcowfs::qcow2 {

struct OpenOptions {
  bool read_only = false;
  bool lock = true;                 // QEMU-compatible image locks on host files
  uint64_t cache_size = 32ull << 20;  // bytes for L2 + refcount-block caches
  bool discard_unmap = true;        // punch freed clusters out of the host file
  // cache=none: the host file, its backing files and its external data file are opened
  // with O_DIRECT (metadata included); see block::RawFileDevice.
  block::DirectIo direct_io;
  // Test hook: disables the tracked-request check in the allocator, to show
  // that the discard-during-rewrite test catches the bug. Never set otherwise.
  bool unsafe_ignore_inflight = false;
  int max_backing_depth = 64;
};

// Devices for an image whose host file is not a path (tests: memory, fault
// injection). Unowned pointers must outlive the image.
struct OpenDevices {
  block::BlockDevice* host = nullptr;
  block::BlockDevice* backing = nullptr;    // overrides the header's backing file
  block::BlockDevice* data_file = nullptr;  // overrides the data-file extension
  std::string name = "image";               // for messages
};

struct SnapshotInfo {
  std::string id;
  std::string name;
  uint64_t date_sec = 0;
  uint64_t vm_clock_ns = 0;
  uint64_t vm_state_size = 0;
  uint64_t disk_size = 0;
};

struct ImageStats {
  uint64_t l2_hits, l2_misses, refblock_hits, refblock_misses;
  uint64_t inflight_requests;
};

// Mapping of one guest extent, produced under meta_mu_.
struct Extent {
  enum Kind { kData, kZero, kBacking, kCompressed, kInvalid } kind;
  uint64_t guest;
  uint64_t len;
  uint64_t host;       // kData: host offset; kCompressed: L2 entry descriptor;
                       // kInvalid: 1 for a bad subcluster bitmap
};

class Qcow2Image final : public block::BlockDevice {
 public:
  static Result<std::unique_ptr<Qcow2Image>> Open(const std::string& path, const OpenOptions& opts);
  static Result<std::unique_ptr<Qcow2Image>> OpenOn(const OpenDevices& devs, const OpenOptions& opts);
  ~Qcow2Image() override;

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  // The host file's (and the data file's) dirty pages: guest data, and tables already
  // written by a flush. Safe at any time: the ordered flush still makes each step durable
  // before the next.
  void StartWriteback() override;
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  // This layer only (a mirror's sync "top"): kData and kZero where this image allocates
  // the range (data, or a zero flag that hides the backing file), kUnallocated where the
  // backing file (or nothing) decides.
  Result<block::BlockStatus> GetTopBlockStatus(uint64_t offset, uint64_t len);
  uint64_t Size() const override { return size_.load(); }
  Status Resize(uint64_t new_size) override;
  // Preallocation: unallocated clusters get a host cluster marked as reading zeros
  // (v3) or filled with what they read (backing data, or zeros on v2).
  Status Allocate(uint64_t offset, uint64_t len) override;
  bool read_only() const override { return read_only_; }
  uint64_t AllocatedBytes() const override;

  // Flushes and marks the image clean (dirty bit cleared). Further calls fail.
  Status Close();

  Header header() const {
    ReaderLock lock(&meta_mu_);
    return header_;
  }
  const Geometry& geometry() const { return geo_; }
  bool corrupt() const { return corrupt_.load(); }
  const std::vector<SnapshotInfo>& snapshots() const { return snapshots_; }
  // Walks every table and checks that no host cluster below `limit` has a refcount
  // below its number of references, past the end of the file included (the
  // corruption an allocation would overwrite data through; like QEMU, Open does not
  // look for it). Corruption names the first such cluster.
  Status CheckRefcounts(uint64_t limit = UINT64_MAX) EXCLUDES(meta_mu_);
  ImageStats Stats();
  block::BlockDevice* backing() const { return backing_; }
  // Chain description for `info`: each backing file below this image, nearest first.
  std::vector<std::string> BackingChain() const;
  // The files of the backing chain, nearest first (paths as opened).
  std::vector<std::string> BackingFiles() const;

 private:
  struct ClusterInfo;  // decoded L2 entry (image_map.cc)
  class GuestClusterLock;

  Qcow2Image() = default;
  Status Init(const OpenDevices& devs, const OpenOptions& opts, const std::string& dir,
              std::set<std::string>* chain);
  Status OpenBacking(const std::string& dir, std::set<std::string>* chain) NO_THREAD_SAFETY_ANALYSIS;
  Status LoadSnapshots();
  Result<block::BlockStatus> BlockStatusOf(uint64_t offset, uint64_t len, bool top_only);
  Status RebuildRefcounts() EXCLUDES(meta_mu_);
  Status CountReferences(bool with_refcounts, std::vector<uint64_t>* counts, std::map<uint64_t, uint64_t>* beyond,
                         uint64_t limit) REQUIRES(meta_mu_);
  Status ClearUnknownAutoclear();

  // --- mapping (image_map.cc)
  // Table at L1 index for reading: nullptr when not cached (caller loads it).
  const uint8_t* CachedL2(uint64_t l1_index, bool* unallocated) REQUIRES_SHARED(meta_mu_);
  Status LoadL2(uint64_t l2_offset) REQUIRES(meta_mu_);
  // Decodes guest cluster gc's entry in its L2 table.
  ClusterInfo Decode(const uint8_t* l2, uint64_t gc) const;
  // Corruption (EIO) for an invalid L2 entry: a bad subcluster bitmap, or an entry an
  // external data file does not allow.
  Status InvalidEntry(uint64_t gc, bool bad_bitmap = false) const;
  void Encode(uint8_t* l2, uint64_t index, uint64_t entry, uint64_t bitmap) const;
  // Maps [off, off+len) within cached tables; returns bytes mapped (0: load needed).
  uint64_t MapCached(uint64_t off, uint64_t len, std::vector<Extent>* out) REQUIRES_SHARED(meta_mu_);
  // Returns a writable L2 table for l1_index (allocating or copying it on write).
  Result<TableCache::Entry*> L2ForWrite(uint64_t l1_index) REQUIRES(meta_mu_);

  // --- data paths (image_io.cc)
  Status ReadExtents(const std::vector<Extent>& ext, uint8_t* buf, uint64_t base);
  Status ReadBacking(uint64_t off, uint8_t* buf, uint64_t len);
  Status ReadCompressed(uint64_t desc, uint8_t* out);
  Status WriteCluster(uint64_t off, const uint8_t* buf, uint64_t len);
  // The shared-lock fast path over several clusters: writes [off, off+len) up to
  // the first cluster that is not allocated data with refcount 1 in the cached
  // L2 tables, one pwrite per run of contiguous host clusters. Returns the bytes
  // written (0: the first cluster needs WriteCluster).
  Result<uint64_t> WriteInPlace(uint64_t off, const uint8_t* buf, uint64_t len) EXCLUDES(meta_mu_);
  // The allocating path over several clusters: [off, off+len) starts on a cluster
  // boundary; the leading whole clusters (up to kMaxFreshClusters, within one L2
  // table) that are unallocated in this layer get one contiguous run of new host
  // clusters, one pwrite and one L2 update. Returns the bytes written (0: fewer than
  // two such clusters, the caller goes on with WriteCluster).
  Result<uint64_t> WriteFresh(uint64_t off, const uint8_t* buf, uint64_t len) EXCLUDES(meta_mu_);
  // Whether bytes [in, in+len) of a cluster can be overwritten where they are:
  // allocated data with refcount 1, every touched subcluster holding data.
  static bool WritableInPlace(const ClusterInfo& ci, uint64_t in, uint64_t len, uint64_t sub);
  Status ZeroRange(uint64_t offset, uint64_t len, bool may_unmap, bool discard) EXCLUDES(meta_mu_);
  Status ZeroCluster(uint64_t cluster_off, uint64_t in_off, uint64_t len, bool may_unmap, bool discard);
  Status WriteDataFile(uint64_t off, const void* buf, size_t len);
  uint64_t SkipUnallocatedSpans(uint64_t pos, uint64_t end) EXCLUDES(meta_mu_);

  // --- refcounts and allocation (image_alloc.cc)
  Result<TableCache::Entry*> Refblock(uint64_t block_index, bool create) REQUIRES(meta_mu_);
  Result<uint64_t> GetRefcountLocked(uint64_t cluster) REQUIRES(meta_mu_);
  Status UpdateRefcount(uint64_t cluster, int64_t delta) REQUIRES(meta_mu_);
  // Takes n contiguous free host clusters (refcount 1 each). reserve: they will hold
  // metadata, so their host space is reserved first (fallocate): a table written later
  // never needs space the host no longer has. Fails with nothing changed.
  Result<uint64_t> AllocClusters(uint64_t n, bool reserve) REQUIRES(meta_mu_);
  // Undoes AllocClusters(n) for clusters no table ever pointed to.
  void UnallocClusters(uint64_t host_off, uint64_t n) REQUIRES(meta_mu_);
  Status ReserveHost(uint64_t off, uint64_t len) REQUIRES(meta_mu_);
  Status CheckFreeIsNotMeta(uint64_t cluster) REQUIRES(meta_mu_);
  // Frees every host cluster an L2 entry holds, after the next metadata flush.
  void FreeEntryLater(uint64_t entry) REQUIRES(meta_mu_);
  void FreeLater(uint64_t host_off, uint64_t nclusters) REQUIRES(meta_mu_);
  Status ApplyPendingFrees() REQUIRES(meta_mu_);
  Status EnsureCacheRoom(TableCache* cache) REQUIRES(meta_mu_);

  // --- metadata flush, header, corruption (image_flush.cc)
  Status FlushLocked() REQUIRES(meta_mu_);
  Status WriteHeaderSync() REQUIRES(meta_mu_);
  Status WriteHeader(const Header& h) REQUIRES(meta_mu_);
  Status SyncDevice(block::BlockDevice* dev) REQUIRES(meta_mu_);
  bool MetadataDirtyLocked() REQUIRES(meta_mu_);
  Status MapRawDataFile(uint64_t from, uint64_t to) EXCLUDES(meta_mu_);
  Status SetDirtyBit() REQUIRES(meta_mu_);
  Status GrowL1(uint64_t min_entries) REQUIRES(meta_mu_);
  Status CheckOverlap(uint64_t off, uint64_t len, const char* what) REQUIRES_SHARED(meta_mu_);
  // What metadata overlaps [off, off+len) (nullptr: none).
  const char* MetaAt(uint64_t off, uint64_t len) const REQUIRES_SHARED(meta_mu_);
  Status MarkCorrupt(const std::string& why);
  void AddMeta(uint64_t off, uint64_t len, const char* what) REQUIRES(meta_mu_);
  void RemoveMeta(uint64_t off) REQUIRES(meta_mu_);

  // Busy guest clusters (allocating writes, zeroing, discard).
  void LockGuest(uint64_t first, uint64_t last) REQUIRES(meta_mu_);
  void UnlockGuest(uint64_t first, uint64_t last) REQUIRES(meta_mu_);
  Status UnlockAndFail(uint64_t gc, Status s) RELEASE(meta_mu_);

  Status CheckWritable();

  // Immutable after open.
  std::string name_;
  std::string dir_;
  Geometry geo_;
  bool read_only_ = false;
  bool has_data_file_ = false;
  bool data_file_raw_ = false;
  bool lazy_refcounts_ = false;
  uint32_t version_ = 3;
  uint8_t compression_type_ = 0;
  OpenOptions opts_;
  block::BlockDevice* host_ = nullptr;
  block::BlockDevice* data_ = nullptr;      // host_ or the external data file
  block::BlockDevice* backing_ = nullptr;
  std::unique_ptr<block::BlockDevice> owned_host_;
  std::unique_ptr<block::BlockDevice> owned_data_;
  std::unique_ptr<block::BlockDevice> owned_backing_;
  std::string backing_desc_;
  std::string backing_path_;  // the backing file as opened (empty: none, or a device)
  std::atomic<uint64_t> size_{0};
  std::atomic<bool> corrupt_{false};
  std::atomic<bool> closed_{false};

  InFlightTable inflight_;

  mutable SharedMutex meta_mu_;
  SharedCondVar busy_cv_;
  Header header_ GUARDED_BY(meta_mu_);
  Header disk_header_ GUARDED_BY(meta_mu_);  // the header as last written (or read)
  // Set once a host flush failed; every later flush returns it (see SyncDevice).
  Status flush_error_ GUARDED_BY(meta_mu_);
  std::vector<uint8_t> cluster0_ GUARDED_BY(meta_mu_);  // header bytes as on disk
  std::vector<uint64_t> l1_ GUARDED_BY(meta_mu_);
  std::set<uint64_t> l1_dirty_ GUARDED_BY(meta_mu_);   // dirty L1 clusters (index)
  bool l1_relocated_ GUARDED_BY(meta_mu_) = false;
  std::vector<uint64_t> reftable_ GUARDED_BY(meta_mu_);
  std::set<uint64_t> reftable_dirty_ GUARDED_BY(meta_mu_);
  bool header_dirty_ GUARDED_BY(meta_mu_) = false;
  bool dirty_bit_on_disk_ GUARDED_BY(meta_mu_) = false;
  std::unique_ptr<TableCache> l2_cache_ PT_GUARDED_BY(meta_mu_);
  std::unique_ptr<TableCache> rb_cache_ PT_GUARDED_BY(meta_mu_);
  uint64_t free_hint_ GUARDED_BY(meta_mu_) = 0;
  // Host clusters whose references were dropped in memory; decremented after flush.
  std::vector<std::pair<uint64_t, uint64_t>> pending_free_ GUARDED_BY(meta_mu_);
  bool metadata_dirty_ GUARDED_BY(meta_mu_) = false;
  // Metadata regions for the overlap check: start -> (end, what).
  std::map<uint64_t, std::pair<uint64_t, const char*>> meta_regions_ GUARDED_BY(meta_mu_);
  std::vector<std::pair<uint64_t, uint64_t>> busy_ GUARDED_BY(meta_mu_);  // guest clusters [a,b]
  std::vector<std::pair<uint64_t, uint32_t>> snapshot_l1s_;  // offset, entries
  std::vector<SnapshotInfo> snapshots_;
};

}  // namespace qcowfs::qcow2
