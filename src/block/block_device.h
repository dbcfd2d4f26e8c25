// BlockDevice: the one interface every layer speaks (qcow2 image, raw host file,
// mirror filter; tests add memory and fault-injection devices).
//
// Contracts (for every implementation):
//  - Read/Write transfer exactly `len` bytes or fail; there are no short transfers.
//  - Read of a range the device has never written returns zeros (host devices read
//    zeros past their end of file; images read zeros for unallocated data).
//  - Write on a host device may extend it; on an image, offset+len must be <= Size().
//  - Flush returns once every write that completed before the call is durable.
//  - Calls may come from many threads at once; implementations are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

#include "util/status.h"

namespace qcowfs::block {

enum class ExtentType {
  kData,         // backed by allocated data in this device or below
  kZero,         // reads as zeros (zero flag, hole)
  kUnallocated,  // not allocated in this layer and nothing below it: reads zeros
};

struct BlockStatus {
  ExtentType type;
  uint64_t length;  // > 0, the extent [offset, offset+length) has this type
};

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;

  virtual Status Read(uint64_t offset, void* buf, size_t len) = 0;
  virtual Status Write(uint64_t offset, const void* buf, size_t len) = 0;
  // Makes [offset, offset+len) read as zeros. may_unmap lets the device free space.
  virtual Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) = 0;
  // Gives space back; the range reads as zeros afterwards.
  virtual Status Discard(uint64_t offset, uint64_t len) = 0;
  virtual Status Flush() = 0;
  // A hint: start writing this device's dirty data to stable storage now, without
  // waiting for it (a later Flush then has less to wait for). Orders nothing and
  // guarantees nothing; where there is no such thing, it does nothing.
  virtual void StartWriteback() {}
  // Status of the extent starting at offset, at most len bytes long.
  virtual Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) = 0;
  virtual uint64_t Size() const = 0;
  // Reserves storage for [offset, offset+len) without changing what it reads
  // (a host device grows to cover the range).
  virtual Status Allocate(uint64_t offset, uint64_t len) {
    (void)offset;
    (void)len;
    return Status::Ok();
  }
  // Grows (or, for host devices, sets) the size.
  virtual Status Resize(uint64_t new_size) = 0;
  virtual bool read_only() const = 0;
  // Bytes of storage this device uses (st_blocks * 512 for files).
  virtual uint64_t AllocatedBytes() const = 0;
};

}  // namespace qcowfs::block
