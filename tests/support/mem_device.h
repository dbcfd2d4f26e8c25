// MemDevice: a sparse in-memory host device for tests (64 KiB chunks in a map).
// Unwritten bytes read as zeros; writes past the end extend Size(); WriteZeroes and
// Discard zero the range and free whole chunks. Thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "block/block_device.h"
#include "util/mutex.h"

namespace qcowfs::testing {

class MemDevice final : public block::BlockDevice {
 public:
  static constexpr uint64_t kChunkSize = 64 * 1024;

  explicit MemDevice(uint64_t size = 0) : size_(size) {}

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override { return Status::Ok(); }
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override;
  // Sets the size (grows or shrinks); bytes past a shrink are dropped.
  Status Resize(uint64_t new_size) override;
  // Grows the device to cover the range (like fallocate mode 0 on a file).
  Status Allocate(uint64_t offset, uint64_t len) override {
    return offset + len > Size() ? Resize(offset + len) : Status::Ok();
  }
  bool read_only() const override { return false; }
  // Number of present chunks * 64 KiB.
  uint64_t AllocatedBytes() const override;

  // The whole device, Size() bytes.
  std::vector<uint8_t> Contents() const;
  // Replaces this device's contents and size with other's (a deep copy).
  void CopyFrom(const MemDevice& other);

 private:
  using Chunk = std::array<uint8_t, kChunkSize>;
  void ReadLocked(uint64_t offset, void* buf, size_t len) const REQUIRES(mu_);
  // REQUIRES: mu_ held. Zeroes [offset, offset+len), dropping chunks that end up all zero
  // or wholly covered.
  void ZeroRangeLocked(uint64_t offset, uint64_t len) REQUIRES(mu_);
  void TruncateLocked(uint64_t new_size) REQUIRES(mu_);

  mutable Mutex mu_;
  uint64_t size_ GUARDED_BY(mu_);
  std::map<uint64_t, std::unique_ptr<Chunk>> chunks_ GUARDED_BY(mu_);  // key: chunk index
};

}  // namespace qcowfs::testing
