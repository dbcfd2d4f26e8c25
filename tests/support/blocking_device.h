// BlockingDevice: passes everything through to a lower device (not owned), except that
// once armed, the next Read and/or Write overlapping a host range stops inside the call,
// before it reaches the lower device, until Release(). Lets a test hold one request in
// flight at a known point and race others against it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "block/block_device.h"

namespace qcowfs::testing {

class BlockingDevice final : public block::BlockDevice {
 public:
  explicit BlockingDevice(block::BlockDevice* lower) : lower_(lower) {}
  ~BlockingDevice() override { Release(); }

  // Arms the trap for one request: the next matching call blocks, later ones do not.
  void Arm(bool on_read, bool on_write, uint64_t host_off, uint64_t len);
  // Disarms and lets a blocked call (if any) continue.
  void Release();
  // True once a call is blocked in the trap (it stays true until Release()).
  bool WaitUntilBlocked(int timeout_ms);
  bool blocked() const;

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    return lower_->WriteZeroes(offset, len, may_unmap);
  }
  Status Discard(uint64_t offset, uint64_t len) override { return lower_->Discard(offset, len); }
  Status Flush() override { return lower_->Flush(); }
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    return lower_->GetBlockStatus(offset, len);
  }
  uint64_t Size() const override { return lower_->Size(); }
  Status Resize(uint64_t new_size) override { return lower_->Resize(new_size); }
  bool read_only() const override { return lower_->read_only(); }
  uint64_t AllocatedBytes() const override { return lower_->AllocatedBytes(); }

 private:
  // Blocks the caller if the armed trap matches this request.
  void MaybeBlock(bool is_write, uint64_t offset, uint64_t len);

  block::BlockDevice* const lower_;
  // std primitives (not util/mutex.h) for the timed wait; a leaf lock never held across
  // a call into lower_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false;
  bool on_read_ = false;
  bool on_write_ = false;
  uint64_t off_ = 0;
  uint64_t len_ = 0;
  bool blocked_ = false;
  uint64_t release_gen_ = 0;
};

}  // namespace qcowfs::testing
