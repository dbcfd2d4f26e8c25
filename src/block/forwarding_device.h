// ForwardingDevice: a BlockDevice wrapper that passes every call to a lower device (not
// owned). Wrappers (the mirror filter, test devices) derive from it and override only
// what they change; every method is forwarded here, none has a silent default.
#pragma once

#include "block/block_device.h"

namespace qcowfs::block {

class ForwardingDevice : public BlockDevice {
 public:
  explicit ForwardingDevice(BlockDevice* lower) : lower_(lower) {}

  Status Read(uint64_t offset, void* buf, size_t len) override { return lower_->Read(offset, buf, len); }
  Status Write(uint64_t offset, const void* buf, size_t len) override { return lower_->Write(offset, buf, len); }
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    return lower_->WriteZeroes(offset, len, may_unmap);
  }
  Status Discard(uint64_t offset, uint64_t len) override { return lower_->Discard(offset, len); }
  Status Flush() override { return lower_->Flush(); }
  void StartWriteback() override { lower_->StartWriteback(); }
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    return lower_->GetBlockStatus(offset, len);
  }
  uint64_t Size() const override { return lower_->Size(); }
  Status Allocate(uint64_t offset, uint64_t len) override { return lower_->Allocate(offset, len); }
  Status Resize(uint64_t new_size) override { return lower_->Resize(new_size); }
  bool read_only() const override { return lower_->read_only(); }
  uint64_t AllocatedBytes() const override { return lower_->AllocatedBytes(); }

 protected:
  BlockDevice* lower() const { return lower_; }

 private:
  BlockDevice* const lower_;
};

}  // namespace qcowfs::block
