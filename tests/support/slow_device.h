// SlowDevice: passes everything through to a lower device (not owned), but data writes
// share one bandwidth: each Write waits for its slot at bytes_per_second (writes from many
// threads queue one after the other, like nbdkit's rate filter). Zeroing, reads and flush
// are not slowed. A target slower than the guest, for the mirror's convergence tests.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>

#include "block/forwarding_device.h"

namespace qcowfs::testing {

class SlowDevice final : public block::ForwardingDevice {
 public:
  SlowDevice(block::BlockDevice* lower, uint64_t bytes_per_second)
      : ForwardingDevice(lower), rate_(bytes_per_second) {}

  Status Write(uint64_t offset, const void* buf, size_t len) override;
  // Bytes written so far (counted when a write completes on the lower device).
  uint64_t bytes_written() const;

 private:
  const uint64_t rate_;
  mutable std::mutex mu_;  // a leaf lock, never held across a call into lower()
  std::chrono::steady_clock::time_point next_free_{};
  uint64_t written_ = 0;
};

}  // namespace qcowfs::testing
