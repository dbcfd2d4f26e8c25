// File descriptor helpers: RAII fd, full pread/pwrite (EINTR, short I/O), hole punching.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"

namespace qcowfs {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() { Reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.Release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      Reset();
      fd_ = o.Release();
    }
    return *this;
  }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int Release() {
    int f = fd_;
    fd_ = -1;
    return f;
  }
  void Reset();

 private:
  int fd_ = -1;
};

// Errno text as "what: strerror" for messages.
std::string ErrnoMessage(const std::string& what, int err);

// Reads len bytes at off; bytes past EOF read as zeros.
Status PreadFull(int fd, void* buf, size_t len, uint64_t off);
Status PwriteFull(int fd, const void* buf, size_t len, uint64_t off);

}  // namespace qcowfs
