// BlockingDevice: passes everything through to a lower device (not owned), except that
// once armed, the next Read and/or Write overlapping a host range stops inside the call,
// before it reaches the lower device, until Release(). Lets a test hold one request in
// flight at a known point and race others against it.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "block/forwarding_device.h"

namespace qcowfs::testing {

class BlockingDevice final : public block::ForwardingDevice {
 public:
  explicit BlockingDevice(block::BlockDevice* lower) : ForwardingDevice(lower) {}
  ~BlockingDevice() override { Release(); }

  // Arms the trap for one request: the next matching call blocks, later ones do not.
  void Arm(bool on_read, bool on_write, uint64_t host_off, uint64_t len);
  // Disarms and lets a blocked call (if any) continue.
  void Release();
  // True once a call is blocked in the trap (it stays true until Release()).
  bool WaitUntilBlocked(int timeout_ms);
  bool blocked() const;

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;

 private:
  // Blocks the caller if the armed trap matches this request.
  void MaybeBlock(bool is_write, uint64_t offset, uint64_t len);

  // std primitives (not util/mutex.h) for the timed wait; a leaf lock never held across
  // a call into lower_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false;
  bool on_read_ = false;
  bool on_write_ = false;
  uint64_t off_ = 0;
  uint64_t len_ = 0;
  bool blocked_ = false;
  uint64_t release_gen_ = 0;
};

}  // namespace qcowfs::testing
