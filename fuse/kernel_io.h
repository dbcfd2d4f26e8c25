// KernelIo: the session's /dev/fuse reads and writes, through libfuse's
// custom-io hook. Four things happen there:
//
// 1. Open replies get FOPEN_PARALLEL_DIRECT_WRITES (libfuse 3.14 has no field
//    for it), so the kernel runs direct writes to one file in parallel instead
//    of under the inode lock; reads already are.
//
// 2. The INIT reply gets FUSE_DIRECT_IO_ALLOW_MMAP (kernel 6.6+, protocol 7.39;
//    not in libfuse 3.14) when the kernel's INIT request offers it, so the
//    direct-io file can be mmap'ed MAP_SHARED (MAP_PRIVATE works without it).
//    The kernel keeps the mapping's pages coherent by itself: a direct read or
//    write first writes back the dirty pages of its range, and a direct write
//    drops the cached ones; PUNCH_HOLE and ZERO_RANGE write the range back before
//    the request and drop it after our reply; a size change drops the cache; and
//    while a file is mapped MAP_SHARED the inode is in "cached io mode", where
//    direct writes take the inode lock exclusively (one at a time) instead of
//    running in parallel. So the daemon sends no invalidations: it only has to
//    finish every change before it replies (mmap_test.cc checks each case).
//
// 3. Adaptive polling of the device. A FUSE request normally costs two
//    cross-CPU wakeups: the application wakes a daemon thread asleep in read(),
//    and the reply wakes the application. On VMs a wakeup of a sleeping vCPU is
//    the largest single cost of a 4 KiB request. So a worker that finds the
//    queue empty first polls it (non-blocking reads) for up to `poll_us`
//    microseconds before it sleeps; a request that arrives meanwhile is taken
//    without any wakeup. To keep idle workers from being woken for requests
//    the poller takes anyway, at most one worker waits on the device once
//    polling is over; the others park on a semaphore. A parked worker is
//    woken when there is more work than the watchers take: a worker found a
//    request already queued and another one behind it (a backlog), or took a
//    request that may block for long (anything but READ and WRITE, so an
//    fsync never holds up reads). No polling after a request that moved more
//    than 128 KiB (the application is busy for long around it, and its wakeup
//    is a small part of its cost) or while requests come further apart than
//    poll_us: then polling would only take CPU time from the application and
//    the kernel's writeback. poll_us = 0: plain blocking reads, every worker
//    waits on the device (libfuse's behaviour).
//
// 4. FUSE over io_uring (ring.h): the INIT reply takes FUSE_OVER_IO_URING when the
//    kernel offers it and the ring transport is prepared (libfuse 3.14 does not know
//    the flag), and a reply made in a ring thread goes into that thread's current
//    ring entry (RingReply) instead of /dev/fuse.
//
// One session per process uses the hook (the state is process-wide).
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

struct fuse_session;

namespace qcowfs::fuse {

// Installs the hook on a mounted session. Returns false if libfuse refuses.
bool InstallKernelIo(fuse_session* se, uint32_t poll_us);

// Wakes every parked worker (the session is ending).
void ReleaseParkedWorkers();

// The device read hook libfuse calls in each worker (exposed for tests): one request
// into buf, or -1 with errno. Never fails with EAGAIN (libfuse's worker loop retries only
// EINTR and takes any other error for the end of the session) or ENOENT.
ssize_t ReadRequest(int fd, void* buf, size_t len, void* userdata);

// The reply (writev) hook libfuse calls (exposed for tests).
ssize_t WriteReply(int fd, struct iovec* iov, int count, void* userdata);

// Where the reply to the request a ring thread is handling goes. Set (per thread) around
// fuse_session_process_buf(); the reply with this unique is copied into the entry: the
// fuse_out_header into out_header, the reply's arguments into payload.
struct RingReply {
  uint64_t unique = 0;
  uint32_t opcode = 0;         // the request's (an OPEN reply gets FOPEN_PARALLEL_DIRECT_WRITES)
  void* out_header = nullptr;  // at least sizeof(fuse_out_header)
  uint8_t* payload = nullptr;
  size_t payload_cap = 0;
  uint32_t payload_len = 0;  // set with the reply
  bool replied = false;      // set with the reply
};
void SetThreadRingReply(RingReply* r);
// In a ring thread handling a request: its entry's payload buffer (page-aligned), if it
// holds len bytes, for a handler to build its reply in place (the reply's copy into the
// entry is then skipped). Else nullptr.
uint8_t* ThreadRingPayload(size_t len);

// The INIT negotiation of the ring transport (process-wide; nullptr: none).
struct InitHook {
  // Whether to take FUSE_OVER_IO_URING if the kernel offers it (the rings are prepared).
  bool (*want)(void* ctx);
  // After the INIT reply was written (ok: the write succeeded): whether the kernel
  // offered the ring, whether the reply took it, and the payload buffer size a ring
  // entry needs (max of 8 KiB, max_write and max_pages pages, as replied).
  void (*done)(void* ctx, bool ok, bool offered, bool taken, size_t payload_size);
  void* ctx;
};
void SetInitHook(const InitHook* hook);

}  // namespace qcowfs::fuse
