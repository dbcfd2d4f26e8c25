// RawFileDevice: a host file as a BlockDevice (the qcow2 host file, a raw backing
// file, an external data file, a raw mirror target). Holds QEMU-compatible image
// locks (OFD byte locks) while open.
//
// Direct mode (--cache none, like QEMU's cache.direct=on): the file is opened with
// O_DIRECT. Requests whose offset, length or buffer are not aligned to what the file
// needs (statx STATX_DIOALIGN; else the block device's logical block size; else 4096)
// go through aligned bounce buffers; a partial host block is read, modified and written
// back while its aligned range is held exclusively in a BlockRangeLock, and every other
// write, write-zeroes, punch and resize holds its range shared (or exclusively for a
// resize), so concurrent writers of different bytes of one host block never lose each
// other's bytes. A bounced write past the end of the file leaves the file ending at the
// end of that host block (as QEMU does); the bytes past the written ones read as zeros.
#pragma once

#include <memory>
#include <string>

#include "block/block_device.h"
#include "block/block_range_lock.h"
#include "util/fd.h"

namespace qcowfs::block {

// What the opener holds and what it refuses to share, as QEMU's lock bytes.
enum class LockMode {
  kNone,      // no locks (tests, files that are not images)
  kShared,    // reader: holds consistent-read, refuses others' write and resize
  kExclusive, // writer: consistent-read + write + resize, refuses others' write, resize
};

// How the host file is cached.
struct DirectIo {
  bool enabled = false;  // O_DIRECT (cache=none)
  // Test hooks. min_align raises the alignment (a power of two, a multiple of what the
  // file needs) so 4K read-modify-write can be tested on a 512-byte-sector host.
  uint32_t min_align = 0;
  // Drops the per-block serialization of read-modify-write, to show that the
  // concurrent-RMW test catches the lost update. Never set otherwise.
  bool unsafe_no_block_lock = false;
};

class RawFileDevice final : public BlockDevice {
 public:
  // Opens path. A lock conflict fails with EAGAIN and a message naming the file. With
  // dio.enabled, a filesystem that refuses O_DIRECT fails with EINVAL and one line
  // naming the file.
  static Result<std::unique_ptr<RawFileDevice>> Open(const std::string& path, bool read_only,
                                                     LockMode lock, const DirectIo& dio = {});

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  // sync_file_range(SYNC_FILE_RANGE_WRITE) over the whole file.
  void StartWriteback() override;
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override;
  Status Resize(uint64_t new_size) override;
  Status Allocate(uint64_t offset, uint64_t len) override;
  bool read_only() const override { return read_only_; }
  uint64_t AllocatedBytes() const override;

  const std::string& path() const { return path_; }
  int fd() const { return fd_.get(); }
  bool direct() const { return direct_; }
  // Offset/length alignment O_DIRECT needs (1 when not direct).
  uint32_t align() const { return align_; }
  uint32_t mem_align() const { return mem_align_; }

 private:
  RawFileDevice(std::string path, UniqueFd fd, bool ro)
      : path_(std::move(path)), fd_(std::move(fd)), read_only_(ro) {}
  Status AcquireLocks(LockMode mode);
  Status SetUpDirect(const DirectIo& dio);
  bool Aligned(uint64_t v) const { return (v & (align_ - 1)) == 0; }
  bool MemAligned(const void* p) const { return (reinterpret_cast<uintptr_t>(p) & (mem_align_ - 1)) == 0; }
  uint64_t AlignDown(uint64_t v) const { return v & ~static_cast<uint64_t>(align_ - 1); }
  uint64_t AlignUp(uint64_t v) const { return AlignDown(v + align_ - 1); }
  BlockRangeLock* range_lock() { return unsafe_no_block_lock_ ? nullptr : &range_lock_; }
  // Direct mode: aligned offset, length and buffer.
  Status DirectPread(void* buf, size_t len, uint64_t off);
  Status DirectPwrite(const void* buf, size_t len, uint64_t off);
  Status DirectRead(uint64_t offset, void* buf, size_t len);
  Status DirectWrite(uint64_t offset, const void* buf, size_t len);
  Status WriteZeroesAsData(uint64_t offset, uint64_t len);

  std::string path_;
  UniqueFd fd_;
  bool read_only_;
  bool direct_ = false;
  uint32_t align_ = 1;
  uint32_t mem_align_ = 1;
  bool unsafe_no_block_lock_ = false;
  BlockRangeLock range_lock_;
};

}  // namespace qcowfs::block
