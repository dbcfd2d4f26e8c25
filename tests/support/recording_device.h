// RecordingDevice and HostLog: host devices that record, for crash tests that enumerate
// crash points instead of sampling them.
//
// Every mutating call (Write, WriteZeroes, Discard, Resize, Allocate) and every Flush of a
// RecordingDevice is appended, in order and with its data, to a HostLog. Several devices
// may share one log (an image and its external data file), so the log has the order in
// which the engine issued the calls across files. The device itself behaves as a
// MemDevice: reads see every write at once.
//
// CrashStates turns a finished log into the host contents after a crash at sync point k,
// k = 1..syncs(): the k-th Flush call (on any device) was issued and did not complete.
// k = syncs() + 1 is a crash at the end of the log. Under
//   - a process kill, every op issued before that Flush persists (the page cache survives);
//   - a power loss, for each device, every op before that device's last completed Flush
//     persists, plus a chosen subset of its later ops ("pending"), applied in their
//     original order. Keeping every pending op is the process kill.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "block/block_device.h"
#include "support/mem_device.h"
#include "util/mutex.h"

namespace qcowfs::testing {

struct HostOp {
  enum Kind { kWrite, kWriteZeroes, kDiscard, kResize, kAllocate, kFlush };
  Kind kind;
  int device;       // HostLog device id
  uint64_t offset;  // new size for kResize
  uint64_t len;
  bool may_unmap;
  std::vector<uint8_t> data;  // kWrite only

  // Applies a mutating op to dev (kFlush: nothing). MemDevice never fails.
  void ApplyTo(MemDevice* dev) const;
};

class HostLog {
 public:
  // Registers a device that starts with a copy of `initial`; returns its id.
  int AddDevice(const MemDevice& initial) EXCLUDES(mu_);
  // Applies op to live (unless it is a Flush) and appends it, as one step: the log order
  // is the order the live views saw.
  void Record(HostOp op, MemDevice* live) EXCLUDES(mu_);

  // Host ops recorded so far (what a guest op issued next would find in the log).
  size_t size() const EXCLUDES(mu_);

  // The accessors below read the finished log: call them once recording has stopped.
  const std::vector<HostOp>& ops() const NO_THREAD_SAFETY_ANALYSIS { return ops_; }
  size_t syncs() const NO_THREAD_SAFETY_ANALYSIS { return flush_pos_.size(); }
  // Index in ops() of the k-th Flush (1-based); syncs() + 1 gives ops().size().
  size_t SyncPos(size_t k) const NO_THREAD_SAFETY_ANALYSIS;
  int devices() const NO_THREAD_SAFETY_ANALYSIS { return static_cast<int>(initial_.size()); }
  const MemDevice& initial(int dev) const NO_THREAD_SAFETY_ANALYSIS { return *initial_[dev]; }

 private:
  mutable Mutex mu_;
  std::vector<HostOp> ops_ GUARDED_BY(mu_);
  std::vector<size_t> flush_pos_ GUARDED_BY(mu_);
  std::vector<std::unique_ptr<MemDevice>> initial_ GUARDED_BY(mu_);
};

class RecordingDevice final : public block::BlockDevice {
 public:
  // A device with a copy of `initial`, recording into log (which must outlive it).
  RecordingDevice(HostLog* log, const MemDevice& initial);

  Status Read(uint64_t offset, void* buf, size_t len) override {
    return live_.Read(offset, buf, len);
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    return live_.GetBlockStatus(offset, len);
  }
  uint64_t Size() const override { return live_.Size(); }
  Status Resize(uint64_t new_size) override;
  // Grows the device to cover the range (like fallocate mode 0 on a file).
  Status Allocate(uint64_t offset, uint64_t len) override;
  bool read_only() const override { return false; }
  uint64_t AllocatedBytes() const override { return live_.AllocatedBytes(); }

  int id() const { return id_; }
  const MemDevice& live() const { return live_; }

 private:
  Status Record(HostOp::Kind kind, uint64_t offset, uint64_t len, bool may_unmap,
                std::vector<uint8_t> data = {});

  HostLog* log_;
  int id_;
  MemDevice live_;
};

// Host contents after a crash at a sync point of a finished log. Materialise() calls must
// come with non-decreasing k (the durable state is carried forward, not rebuilt).
class CrashStates {
 public:
  explicit CrashStates(const HostLog& log);

  // Log indices (ascending) of the ops a power loss at sync k may lose: per device, the
  // ops after its last Flush before the point. Moves the durable state to k.
  const std::vector<size_t>& Pending(size_t k);
  // Writes into out[d] (one per device) the contents of device d after a crash at sync k
  // in which Pending(k)[i] reached the disk iff keep[i] (keep.size() == Pending(k).size()).
  void Materialise(size_t k, const std::vector<bool>& keep,
                   std::vector<std::unique_ptr<MemDevice>>* out);

 private:
  void AdvanceTo(size_t k);

  const HostLog& log_;
  size_t k_ = 0;
  size_t pos_ = 0;  // ops before pos_ are either applied to durable_ or in pending_
  std::vector<std::unique_ptr<MemDevice>> durable_;  // per device, through its last Flush
  std::vector<size_t> pending_;
};

}  // namespace qcowfs::testing
