#include "fuse/kernel_io.h"

#include <linux/fuse.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <mutex>
#include <unordered_set>

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

namespace qcowfs::fuse {
namespace {

// Unique ids of FUSE_OPEN requests not yet answered. Leaf lock, held for a set
// operation only.
std::mutex g_mu;
std::unordered_set<uint64_t> g_open_requests;

ssize_t Read(int fd, void* buf, size_t len, void*) {
  ssize_t n = ::read(fd, buf, len);
  if (n >= static_cast<ssize_t>(sizeof(fuse_in_header))) {
    const auto* in = static_cast<const fuse_in_header*>(buf);
    if (in->opcode == FUSE_OPEN) {
      int saved = errno;
      std::lock_guard<std::mutex> l(g_mu);
      g_open_requests.insert(in->unique);
      errno = saved;
    }
  }
  return n;
}

ssize_t Writev(int fd, struct iovec* iov, int count, void*) {
  if (count >= 1 && iov[0].iov_len >= sizeof(fuse_out_header)) {
    auto* out = static_cast<fuse_out_header*>(iov[0].iov_base);
    bool was_open;
    {
      std::lock_guard<std::mutex> l(g_mu);
      was_open = g_open_requests.erase(out->unique) > 0;
    }
    if (was_open && out->error == 0 && count >= 2 && iov[1].iov_len >= sizeof(fuse_open_out)) {
      auto* arg = static_cast<fuse_open_out*>(iov[1].iov_base);
      if (arg->open_flags & FOPEN_DIRECT_IO) arg->open_flags |= FOPEN_PARALLEL_DIRECT_WRITES;
    }
  }
  return ::writev(fd, iov, count);
}

}  // namespace

bool InstallKernelIo(fuse_session* se) {
  static const fuse_custom_io io = {Writev, Read, nullptr, nullptr};
  return fuse_session_custom_io(se, &io, fuse_session_fd(se)) == 0;
}

}  // namespace qcowfs::fuse
