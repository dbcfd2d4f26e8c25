// MirrorFilter: the device the FUSE frontend sees for every mounted image. Without a job
// it passes every call to the image (one per-thread shared lock, no other cost). With a job it tells
// the job about each completed guest write, zero-range and discard (background: mark
// dirty; write-blocking: also write the bytes to the target), lets copy-on-read see guest
// reads, refuses growth (EBUSY), and at `complete` it is paused (no guest request in
// flight) while the job pivots it onto the target.
//
// Lock order: io_mu_ (shared by every guest request, exclusive to attach/detach/pivot)
// -> MirrorJob::mu_ -> the image's own locks. A guest request never holds io_mu_
// exclusively, and the job never takes io_mu_ while holding its own mu_.
#pragma once

#include "block/block_device.h"
#include "util/mutex.h"
#include "util/reader_mostly_mutex.h"
#include "util/thread_annotations.h"

namespace qcowfs::mirror {

class MirrorJob;

class MirrorFilter final : public block::BlockDevice {
 public:
  explicit MirrorFilter(block::BlockDevice* image) : lower_(image) {}

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  void StartWriteback() override;
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override;
  Status Allocate(uint64_t offset, uint64_t len) override;
  Status Resize(uint64_t new_size) override;
  bool read_only() const override;
  uint64_t AllocatedBytes() const override;

  // The device under the filter now (the image, or the target after a pivot).
  block::BlockDevice* lower() const;

  // Exclusive section: waits for every guest request in flight to finish and holds new
  // ones until Resume(). Attach/Detach/SetLower are called inside it.
  void Pause() ACQUIRE(io_mu_) { io_mu_.Lock(); }
  void Resume() RELEASE(io_mu_) { io_mu_.Unlock(); }
  void SetJob(MirrorJob* job) REQUIRES(io_mu_) { job_ = job; }
  void SetLower(block::BlockDevice* dev) REQUIRES(io_mu_) { lower_ = dev; }
  bool has_job() const;

 private:
  // Per-thread reader counts (util/reader_mostly_mutex.h): no cache line shared by every
  // request. Never taken shared twice by one thread.
  mutable ReaderMostlyMutex io_mu_;
  block::BlockDevice* lower_ GUARDED_BY(io_mu_);
  MirrorJob* job_ GUARDED_BY(io_mu_) = nullptr;
};

}  // namespace qcowfs::mirror
