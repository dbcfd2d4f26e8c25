#include "support/blocking_device.h"

#include <chrono>

namespace qcowfs::testing {

void BlockingDevice::Arm(bool on_read, bool on_write, uint64_t host_off, uint64_t len) {
  std::lock_guard<std::mutex> l(mu_);
  armed_ = true;
  on_read_ = on_read;
  on_write_ = on_write;
  off_ = host_off;
  len_ = len;
}

void BlockingDevice::Release() {
  std::lock_guard<std::mutex> l(mu_);
  armed_ = false;
  ++release_gen_;
  cv_.notify_all();
}

bool BlockingDevice::WaitUntilBlocked(int timeout_ms) {
  std::unique_lock<std::mutex> l(mu_);
  return cv_.wait_for(l, std::chrono::milliseconds(timeout_ms), [this] { return blocked_; });
}

bool BlockingDevice::blocked() const {
  std::lock_guard<std::mutex> l(mu_);
  return blocked_;
}

void BlockingDevice::MaybeBlock(bool is_write, uint64_t offset, uint64_t len) {
  std::unique_lock<std::mutex> l(mu_);
  if (!armed_ || (is_write ? !on_write_ : !on_read_)) return;
  if (offset >= off_ + len_ || off_ >= offset + len) return;  // no overlap
  armed_ = false;
  blocked_ = true;
  uint64_t gen = release_gen_;
  cv_.notify_all();
  cv_.wait(l, [&] { return release_gen_ != gen; });
  blocked_ = false;
}

Status BlockingDevice::Read(uint64_t offset, void* buf, size_t len) {
  MaybeBlock(false, offset, len);
  return lower()->Read(offset, buf, len);
}

Status BlockingDevice::Write(uint64_t offset, const void* buf, size_t len) {
  MaybeBlock(true, offset, len);
  return lower()->Write(offset, buf, len);
}

}  // namespace qcowfs::testing
