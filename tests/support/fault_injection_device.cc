#include "support/fault_injection_device.h"

#include <cstring>
#include <utility>

namespace qcowfs::testing {

FaultInjectionDevice::FaultInjectionDevice(uint64_t size) : live_(size), durable_(size) {}

FaultInjectionDevice::FaultInjectionDevice(const MemDevice& initial) {
  live_.CopyFrom(initial);
  MutexLock l(&mu_);
  durable_.CopyFrom(initial);
}

Status FaultInjectionDevice::CheckFailLocked() {
  if (fail_budget_ == 0) {
    ++failed_;
    return Status::IoError("fault injection: device failed");
  }
  if (fail_budget_ > 0) --fail_budget_;
  return Status::Ok();
}

Status FaultInjectionDevice::Apply(MemDevice* dev, const Op& op) {
  switch (op.kind) {
    case OpKind::kWrite:
      return dev->Write(op.offset, op.data.data(), op.data.size());
    case OpKind::kWriteZeroes:
      return dev->WriteZeroes(op.offset, op.len, op.may_unmap);
    case OpKind::kDiscard:
      return dev->Discard(op.offset, op.len);
    case OpKind::kResize:
      return dev->Resize(op.offset);
  }
  return Status::Invalid("bad op");
}

Status FaultInjectionDevice::Mutate(Op op) {
  MutexLock l(&mu_);
  RETURN_IF_ERROR(CheckFailLocked());
  RETURN_IF_ERROR(Apply(&live_, op));
  ++writes_;
  pending_.push_back(std::move(op));
  return Status::Ok();
}

Status FaultInjectionDevice::Read(uint64_t offset, void* buf, size_t len) {
  {
    MutexLock l(&mu_);
    ++reads_;
  }
  return live_.Read(offset, buf, len);
}

Status FaultInjectionDevice::Write(uint64_t offset, const void* buf, size_t len) {
  const auto* p = static_cast<const uint8_t*>(buf);
  return Mutate(Op{OpKind::kWrite, offset, len, false, std::vector<uint8_t>(p, p + len)});
}

Status FaultInjectionDevice::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  return Mutate(Op{OpKind::kWriteZeroes, offset, len, may_unmap, {}});
}

Status FaultInjectionDevice::Discard(uint64_t offset, uint64_t len) {
  return Mutate(Op{OpKind::kDiscard, offset, len, true, {}});
}

Status FaultInjectionDevice::Resize(uint64_t new_size) {
  return Mutate(Op{OpKind::kResize, new_size, 0, false, {}});
}

Status FaultInjectionDevice::Flush() {
  MutexLock l(&mu_);
  RETURN_IF_ERROR(CheckFailLocked());
  for (const Op& op : pending_) RETURN_IF_ERROR(Apply(&durable_, op));
  pending_.clear();
  ++flushes_;
  return Status::Ok();
}

Result<block::BlockStatus> FaultInjectionDevice::GetBlockStatus(uint64_t offset, uint64_t len) {
  return live_.GetBlockStatus(offset, len);
}

uint64_t FaultInjectionDevice::Size() const { return live_.Size(); }

uint64_t FaultInjectionDevice::AllocatedBytes() const { return live_.AllocatedBytes(); }

void FaultInjectionDevice::Crash(std::mt19937_64* rng, bool drop_all) {
  MutexLock l(&mu_);
  if (!drop_all && rng != nullptr) {
    std::bernoulli_distribution keep(0.5);
    for (const Op& op : pending_) {
      if (keep(*rng)) {
        Status s = Apply(&durable_, op);
        (void)s;  // MemDevice never fails.
      }
    }
  }
  pending_.clear();
  live_.CopyFrom(durable_);
}

void FaultInjectionDevice::FailWritesAfter(int n) {
  MutexLock l(&mu_);
  fail_budget_ = n;
}

uint64_t FaultInjectionDevice::reads() const {
  MutexLock l(&mu_);
  return reads_;
}
uint64_t FaultInjectionDevice::writes() const {
  MutexLock l(&mu_);
  return writes_;
}
uint64_t FaultInjectionDevice::flushes() const {
  MutexLock l(&mu_);
  return flushes_;
}
uint64_t FaultInjectionDevice::failed_ops() const {
  MutexLock l(&mu_);
  return failed_;
}
size_t FaultInjectionDevice::pending_ops() const {
  MutexLock l(&mu_);
  return pending_.size();
}

std::vector<uint8_t> FaultInjectionDevice::DurableContents() const {
  MutexLock l(&mu_);
  return durable_.Contents();
}

}  // namespace qcowfs::testing
