// RawFileDevice: a host file as a BlockDevice (the qcow2 host file, a raw backing
// file, an external data file, a raw mirror target). Holds QEMU-compatible image
// locks (OFD byte locks) while open.
#pragma once

#include <memory>
#include <string>

#include "block/block_device.h"
#include "util/fd.h"

namespace qcowfs::block {

// What the opener holds and what it refuses to share, as QEMU's lock bytes.
enum class LockMode {
  kNone,      // no locks (tests, files that are not images)
  kShared,    // reader: holds consistent-read, refuses others' write and resize
  kExclusive, // writer: consistent-read + write + resize, refuses others' write, resize
};

class RawFileDevice final : public BlockDevice {
 public:
  // Opens path. A lock conflict fails with EAGAIN and a message naming the file.
  static Result<std::unique_ptr<RawFileDevice>> Open(const std::string& path, bool read_only,
                                                     LockMode lock);

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override;
  Status Resize(uint64_t new_size) override;
  Status Allocate(uint64_t offset, uint64_t len) override;
  bool read_only() const override { return read_only_; }
  uint64_t AllocatedBytes() const override;

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }

 private:
  RawFileDevice(std::string path, UniqueFd fd, bool ro)
      : path_(std::move(path)), fd_(std::move(fd)), read_only_(ro) {}
  Status AcquireLocks(LockMode mode);

  std::string path_;
  UniqueFd fd_;
  bool read_only_;
};

}  // namespace qcowfs::block
