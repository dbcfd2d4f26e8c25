#include "support/slow_device.h"

#include <algorithm>
#include <thread>

namespace qcowfs::testing {

Status SlowDevice::Write(uint64_t offset, const void* buf, size_t len) {
  using Clock = std::chrono::steady_clock;
  Clock::time_point done;
  {
    std::lock_guard<std::mutex> l(mu_);
    Clock::time_point start = std::max(Clock::now(), next_free_);
    next_free_ = start + std::chrono::microseconds(len * 1000000 / rate_);
    done = next_free_;
  }
  std::this_thread::sleep_until(done);
  Status s = lower()->Write(offset, buf, len);
  std::lock_guard<std::mutex> l(mu_);
  if (s.ok()) written_ += len;
  return s;
}

uint64_t SlowDevice::bytes_written() const {
  std::lock_guard<std::mutex> l(mu_);
  return written_;
}

}  // namespace qcowfs::testing
