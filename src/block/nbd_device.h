// NbdDevice: an export on an NBD server, through libnbd, as a BlockDevice (mirror
// targets; after a pivot, the mounted image itself).
//
// Threading. One libnbd handle (one connection) per device, driven only through libnbd's
// aio API: its synchronous calls hold the handle lock and poll with no timeout, so a hung
// server would hang every caller. A caller submits its command under the connection's
// mutex, then waits for that command alone. Of the waiting callers, one at a time is the
// driver: it polls the socket (in the direction libnbd asks for) and an eventfd without
// the mutex, then, under it, lets libnbd read or write (nbd_aio_notify_*) and wakes the
// others, who check their own command (nbd_aio_command_completed) and take over driving
// when the driver leaves. A submitter kicks the eventfd so the driver polls again with the
// new direction. Commands from many threads are thus in flight at once on the one
// connection. Callers must not have overlapping writes in flight at once (NBD leaves
// their order undefined); the mirror's op table ensures it.
//
// Timeouts. Connect (TCP connect and the NBD handshake) has one deadline, `timeout` from
// the call; every NBD command has its own, `timeout` from its submission. A command past
// its deadline fails with ETIMEDOUT and breaks the device: the socket is shut down and
// libnbd is never driven again, so it never touches the buffers of abandoned commands,
// and every later call fails at once. A lost connection breaks the device the same way;
// Abort() does it on purpose (mirror cancel). nbd_shutdown(3) is never called: it waits
// for the server with no deadline. Errors name the URI and carry libnbd's message.
//
// Alignment. libnbd's strict mode stays on: it refuses requests that are not aligned to the
// server's advertised minimum block size before they are sent, and the NBD protocol lets a
// server reject them anyway, so clearing LIBNBD_STRICT_ALIGN would only move the failure
// to the server. Instead partial blocks at the edges of a request are handled here: reads
// read the whole block into a bounce buffer; writes and zeroes read-modify-write it. An RMW
// holds rmw_mu_ exclusively for the whole request and every aligned write holds it shared,
// so no write to the same block can land between an RMW's read and its write. With a
// minimum of 1 (nbdkit, qemu-nbd on most files) nothing is ever unaligned. A server that
// advertises no minimum is treated as QEMU's NBD client does: 1 if it offers block status
// or has a size that is not a multiple of 512, else 512.
//
// Limits. Reads and writes are split at the server's maximum block size (32 MiB if it
// advertises none, and never more); write-zeroes and block-status requests at 1 GiB
// (below NBD's 32-bit lengths, and short enough for one timeout).
//
// Semantics. WriteZeroes is NBD WRITE_ZEROES, with NO_HOLE unless may_unmap; a server
// without WRITE_ZEROES gets zero data. Discard is WriteZeroes(may_unmap=true): NBD TRIM is
// never sent, since a server may ignore it and keep the old data (SPEC §6). Flush is NBD
// FLUSH, or nothing if the server has none. The size is fixed at connect: Resize fails
// with ENOTSUP (except to the same size). Allocate does nothing (NBD has no
// preallocation). AllocatedBytes reports the whole size: NBD cannot tell it cheaply, and
// a file that claims no blocks makes some tools skip its data. Past the end, as
// Qcow2Image: reads fail with EINVAL, writes and zeroes with ENOSPC, discards are clipped;
// block status of an offset at or past the end fails with EINVAL. GetBlockStatus reports
// base:allocation: hole+zero is kUnallocated, zero alone kZero, anything else kData (a
// hole without the zero bit may read non-zero); without base:allocation, all is kData.
//
// Lock order: NbdDevice::rmw_mu_ → NbdConnection::mu_ (a leaf, never held across poll).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "block/block_device.h"
#include "util/mutex.h"

namespace qcowfs::block {

class NbdConnection;  // nbd_device.cc: the libnbd handle, its mutex and the driving

class NbdDevice final : public BlockDevice {
 public:
  // Connects to uri (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, or any
  // other URI libnbd takes), given as is to libnbd. Fails with ETIMEDOUT if the server does
  // not complete the handshake within timeout, with EROFS for a read-only export, and with
  // libnbd's errno otherwise; every message names the URI. (libnbd resolves a host name
  // with a blocking getaddrinfo inside nbd_aio_connect_uri: that is not bounded.)
  static Result<std::unique_ptr<NbdDevice>> Connect(const std::string& uri,
                                                    std::chrono::milliseconds timeout);
  // Disconnects (NBD_CMD_DISC, waiting at most the timeout for the server to close) unless
  // the device is broken; after Abort() it closes at once. No call may be in flight.
  ~NbdDevice() override;

  Status Read(uint64_t offset, void* buf, size_t len) override;
  Status Write(uint64_t offset, const void* buf, size_t len) override;
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override;
  Status Discard(uint64_t offset, uint64_t len) override;
  Status Flush() override;
  // Posts an NBD FLUSH without waiting for it (nothing if the server has no FLUSH).
  void StartWriteback() override;
  Result<BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override;
  uint64_t Size() const override { return size_; }
  Status Allocate(uint64_t offset, uint64_t len) override;
  Status Resize(uint64_t new_size) override;
  bool read_only() const override { return false; }
  uint64_t AllocatedBytes() const override { return size_; }

  // Breaks the device now: calls in flight and every later call fail with ECANCELED, and
  // the connection is shut down without waiting for the server. Thread-safe.
  void Abort();

  const std::string& uri() const { return uri_; }
  // What the server offered at connect (for logs and tests).
  uint64_t min_block() const { return min_block_; }
  uint64_t max_io() const { return max_io_; }
  bool can_zero() const { return can_zero_; }
  bool can_flush() const { return can_flush_; }
  bool can_block_status() const { return can_block_status_; }

 private:
  NbdDevice(std::unique_ptr<NbdConnection> conn, std::string uri, uint64_t size,
            uint64_t min_block, uint64_t max_io, bool can_zero, bool can_flush,
            bool can_block_status);

  bool Aligned(uint64_t v) const { return (v & (min_block_ - 1)) == 0; }
  uint64_t AlignDown(uint64_t v) const { return v & ~(min_block_ - 1); }
  // One NBD command each, on whole blocks; at most max_io_ (read/write) or 1 GiB (zero).
  Status ReadAligned(uint64_t offset, void* buf, uint64_t len);
  Status WriteAligned(uint64_t offset, const void* buf, uint64_t len);
  Status ZeroAligned(uint64_t offset, uint64_t len, bool may_unmap);
  // Writes len bytes of data (zeros if data is null) at skip into the block at block_off.
  // REQUIRES: rmw_mu_ held exclusively (the analysis cannot tell which way it is held).
  Status ReadModifyWrite(uint64_t block_off, uint64_t skip, const void* data, uint64_t len);
  // The bodies of Write and WriteZeroes (data null: zeros). REQUIRES: rmw_mu_ held, and
  // held exclusively if the request has a partial block.
  Status WriteLocked(uint64_t offset, const uint8_t* data, uint64_t len, bool may_unmap)
      REQUIRES_SHARED(rmw_mu_);
  Status CheckWriteRange(uint64_t offset, uint64_t len) const;

  const std::unique_ptr<NbdConnection> conn_;
  const std::string uri_;
  const uint64_t size_;
  const uint64_t min_block_;  // a power of two, >= 1; size_ is a multiple of it
  const uint64_t max_io_;     // a multiple of min_block_, <= 32 MiB
  const bool can_zero_;
  const bool can_flush_;
  const bool can_block_status_;
  // Shared by aligned writes and zeroes, exclusive for a request with a partial block
  // (read-modify-write). Reads take nothing.
  SharedMutex rmw_mu_;
};

}  // namespace qcowfs::block
