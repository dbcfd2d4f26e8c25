// FaultInjectionDevice: a host device that models a volatile write cache, for crash tests
// (after rocksdb's FaultInjectionTestFS).
//
// Every Write/WriteZeroes/Discard/Resize applies to the live view at once (reads see it) and
// is logged as pending. Flush() makes everything pending durable. Crash() throws the live
// view away: what survives is the durable image plus, unless drop_all, a random subset of the
// pending operations applied in their original order (a cache that reached the disk in part,
// in no particular order). After Crash() the device is usable again, as after a reboot.
//
// FailWritesAfter(n) makes every mutating call and Flush fail with EIO once n more of them
// have succeeded (error-path tests). Thread-safe.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "block/block_device.h"
#include "support/mem_device.h"
#include "util/mutex.h"

namespace qcowfs::testing {

class FaultInjectionDevice final : public block::BlockDevice {
 public:
  explicit FaultInjectionDevice(uint64_t size = 0);
  // Starts with a copy of initial as both the durable and the live contents.
  explicit FaultInjectionDevice(const MemDevice& initial);

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override;
  Status Resize(uint64_t new_size) override;
  // Grows the device to cover the range (like fallocate mode 0 on a file).
  Status Allocate(uint64_t offset, uint64_t len) override {
    return offset + len > Size() ? Resize(offset + len) : Status::Ok();
  }
  bool read_only() const override { return false; }
  uint64_t AllocatedBytes() const override;

  // Simulates power loss; see the file comment. rng may be null when drop_all is true.
  void Crash(std::mt19937_64* rng, bool drop_all);

  // After n more successful mutating calls (Write, WriteZeroes, Discard, Resize, Flush),
  // all of them fail with EIO. n < 0 turns failures off again.
  void FailWritesAfter(int n);

  // Counters since construction (failed calls are counted in failed_ops only).
  uint64_t reads() const;
  uint64_t writes() const;  // Write + WriteZeroes + Discard + Resize
  uint64_t flushes() const;
  uint64_t failed_ops() const;
  size_t pending_ops() const;

  // Snapshots (deep copies) of the two views, Size() bytes each.
  std::vector<uint8_t> LiveContents() const { return live_.Contents(); }
  std::vector<uint8_t> DurableContents() const;

 private:
  enum class OpKind { kWrite, kWriteZeroes, kDiscard, kResize };
  struct Op {
    OpKind kind;
    uint64_t offset;  // new size for kResize
    uint64_t len;
    bool may_unmap;
    std::vector<uint8_t> data;  // kWrite only
  };

  // Consumes one unit of the failure budget. REQUIRES: mu_ held.
  Status CheckFailLocked() REQUIRES(mu_);
  static Status Apply(MemDevice* dev, const Op& op);
  Status Mutate(Op op) EXCLUDES(mu_);

  // live_ and durable_ are thread-safe on their own; mu_ serialises mutations so that the
  // pending log has the order in which the live view saw them. Leaf lock: MemDevice's
  // mutex is taken inside it and never the other way round.
  mutable Mutex mu_;
  MemDevice live_;
  MemDevice durable_ GUARDED_BY(mu_);
  std::vector<Op> pending_ GUARDED_BY(mu_);
  int fail_budget_ GUARDED_BY(mu_) = -1;  // < 0: never fail
  uint64_t reads_ GUARDED_BY(mu_) = 0;
  uint64_t writes_ GUARDED_BY(mu_) = 0;
  uint64_t flushes_ GUARDED_BY(mu_) = 0;
  uint64_t failed_ GUARDED_BY(mu_) = 0;
};

}  // namespace qcowfs::testing
