#include "support/recording_device.h"

#include <algorithm>
#include <utility>

namespace qcowfs::testing {

void HostOp::ApplyTo(MemDevice* dev) const {
  Status s;
  switch (kind) {
    case kWrite:
      s = dev->Write(offset, data.data(), data.size());
      break;
    case kWriteZeroes:
      s = dev->WriteZeroes(offset, len, may_unmap);
      break;
    case kDiscard:
      s = dev->Discard(offset, len);
      break;
    case kResize:
      s = dev->Resize(offset);
      break;
    case kAllocate:
      s = dev->Allocate(offset, len);
      break;
    case kFlush:
      break;
  }
  (void)s;  // MemDevice never fails
}

int HostLog::AddDevice(const MemDevice& initial) {
  auto copy = std::make_unique<MemDevice>();
  copy->CopyFrom(initial);
  MutexLock l(&mu_);
  initial_.push_back(std::move(copy));
  return static_cast<int>(initial_.size()) - 1;
}

void HostLog::Record(HostOp op, MemDevice* live) {
  MutexLock l(&mu_);
  op.ApplyTo(live);
  if (op.kind == HostOp::kFlush) flush_pos_.push_back(ops_.size());
  ops_.push_back(std::move(op));
}

size_t HostLog::size() const {
  MutexLock l(&mu_);
  return ops_.size();
}

size_t HostLog::SyncPos(size_t k) const {
  return k <= flush_pos_.size() ? flush_pos_[k - 1] : ops_.size();
}

RecordingDevice::RecordingDevice(HostLog* log, const MemDevice& initial)
    : log_(log), id_(log->AddDevice(initial)) {
  live_.CopyFrom(initial);
}

Status RecordingDevice::Record(HostOp::Kind kind, uint64_t offset, uint64_t len, bool may_unmap,
                               std::vector<uint8_t> data) {
  log_->Record(HostOp{kind, id_, offset, len, may_unmap, std::move(data)}, &live_);
  return Status::Ok();
}

Status RecordingDevice::Write(uint64_t offset, const void* buf, size_t len) {
  const auto* p = static_cast<const uint8_t*>(buf);
  return Record(HostOp::kWrite, offset, len, false, std::vector<uint8_t>(p, p + len));
}

Status RecordingDevice::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  return Record(HostOp::kWriteZeroes, offset, len, may_unmap);
}

Status RecordingDevice::Discard(uint64_t offset, uint64_t len) {
  return Record(HostOp::kDiscard, offset, len, true);
}

Status RecordingDevice::Flush() { return Record(HostOp::kFlush, 0, 0, false); }

Status RecordingDevice::Resize(uint64_t new_size) {
  return Record(HostOp::kResize, new_size, 0, false);
}

Status RecordingDevice::Allocate(uint64_t offset, uint64_t len) {
  return Record(HostOp::kAllocate, offset, len, false);
}

CrashStates::CrashStates(const HostLog& log) : log_(log) {
  for (int d = 0; d < log.devices(); d++) {
    durable_.push_back(std::make_unique<MemDevice>());
    durable_.back()->CopyFrom(log.initial(d));
  }
}

void CrashStates::AdvanceTo(size_t k) {
  if (k < k_) {  // moving back: start over
    for (int d = 0; d < log_.devices(); d++) durable_[d]->CopyFrom(log_.initial(d));
    pending_.clear();
    pos_ = 0;
  }
  k_ = k;
  const size_t end = log_.SyncPos(k);
  const std::vector<HostOp>& ops = log_.ops();
  for (; pos_ < end; pos_++) {
    const HostOp& op = ops[pos_];
    if (op.kind != HostOp::kFlush) {
      pending_.push_back(pos_);
      continue;
    }
    // A completed Flush makes its device's pending ops durable.
    auto mine = [&](size_t i) { return ops[i].device == op.device; };
    for (size_t i : pending_)
      if (mine(i)) ops[i].ApplyTo(durable_[op.device].get());
    pending_.erase(std::remove_if(pending_.begin(), pending_.end(), mine), pending_.end());
  }
}

const std::vector<size_t>& CrashStates::Pending(size_t k) {
  AdvanceTo(k);
  return pending_;
}

void CrashStates::Materialise(size_t k, const std::vector<bool>& keep,
                              std::vector<std::unique_ptr<MemDevice>>* out) {
  AdvanceTo(k);
  out->resize(durable_.size());
  for (size_t d = 0; d < durable_.size(); d++) {
    if (!(*out)[d]) (*out)[d] = std::make_unique<MemDevice>();
    (*out)[d]->CopyFrom(*durable_[d]);
  }
  const std::vector<HostOp>& ops = log_.ops();
  for (size_t i = 0; i < pending_.size(); i++)
    if (i < keep.size() && keep[i]) ops[pending_[i]].ApplyTo((*out)[ops[pending_[i]].device].get());
}

}  // namespace qcowfs::testing
