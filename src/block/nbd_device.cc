#include "block/nbd_device.h"

#include <libnbd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <vector>

#include "util/fd.h"
#include "util/log.h"

namespace qcowfs::block {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint64_t kMiB = 1024 * 1024;
constexpr uint64_t kMaxIo = 32 * kMiB;           // pread/pwrite cap (many servers: 32M)
constexpr uint64_t kMaxZero = 1024 * kMiB;       // write-zeroes per command
constexpr uint64_t kMaxStatusQuery = 1024 * kMiB;  // block-status query length
constexpr uint64_t kZeroChunk = 1 * kMiB;        // zero data per write, without WRITE_ZEROES

// Zero data for servers without WRITE_ZEROES (bss: costs no memory until sent).
const uint8_t kZeros[kZeroChunk] = {};

std::string Hex(uint64_t v) {
  char buf[32];
  snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string What(const char* op, uint64_t offset, uint64_t len) {
  return std::string(op) + " of " + std::to_string(len) + " bytes at " + Hex(offset);
}

// libnbd's error of the last failed call in this thread.
Status NbdError(int fallback_errno, const std::string& prefix) {
  int err = nbd_get_errno();
  const char* msg = nbd_get_error();
  return Status::Error(err > 0 ? err : fallback_errno,
                       prefix + ": " + (msg && *msg ? msg : "unknown libnbd error"));
}

}  // namespace

// The libnbd handle and the leader/follower driving of its state machine (see the header).
class NbdConnection {
 public:
  // Submits one command: returns libnbd's cookie, or -1 with libnbd's error set.
  using Submit = std::function<int64_t(nbd_handle*)>;

  static Result<std::unique_ptr<NbdConnection>> Open(const std::string& uri,
                                                     std::chrono::milliseconds timeout);
  ~NbdConnection();

  nbd_handle* handle() const { return h_; }
  // Submits the command and waits for it until its deadline. `what` is for messages.
  Status Run(const std::string& what, const Submit& submit) EXCLUDES(mu_);
  // Submits the command and does not wait: libnbd retires it when it completes, whatever
  // its result (hints only). Whoever drives next sends it.
  void Post(const Submit& submit) EXCLUDES(mu_);
  void Abort() EXCLUDES(mu_);

 private:
  NbdConnection(std::string uri, std::chrono::milliseconds timeout, nbd_handle* h, int wake)
      : uri_(std::move(uri)), timeout_(timeout), h_(h), wake_(wake) {}
  // Drives the handshake started by nbd_aio_connect_uri until ready or the deadline.
  Status Handshake(Clock::time_point deadline) EXCLUDES(mu_);
  // Waits until cookie has completed, driving the state machine when nobody else does.
  Status Await(int64_t cookie, Clock::time_point deadline, const std::string& what)
      REQUIRES(mu_);
  // One round as the driver: poll (mu_ released), then notify libnbd under mu_.
  void DriveOnce(Clock::time_point deadline) REQUIRES(mu_);
  // Marks the connection broken (sticky) and shuts the socket down.
  void Break(Status why) REQUIRES(mu_);
  // Breaks the connection if libnbd found it dead (uses this thread's libnbd error).
  void BreakIfDead() REQUIRES(mu_);
  void Kick();
  void WaitUntil(Clock::time_point deadline) REQUIRES(mu_) NO_THREAD_SAFETY_ANALYSIS {
    std::unique_lock<std::mutex> lk(mu_.native(), std::adopt_lock);
    cv_.wait_until(lk, deadline);
    lk.release();
  }
  bool Dead() REQUIRES(mu_) { return nbd_aio_is_dead(h_) == 1 || nbd_aio_is_closed(h_) == 1; }

  const std::string uri_;
  const std::chrono::milliseconds timeout_;
  nbd_handle* const h_;  // thread-safe; every call that drives or retires is made under mu_
  const UniqueFd wake_;  // eventfd: kicks the driver out of poll

  Mutex mu_;
  std::condition_variable cv_;  // with mu_: a driving round ended, or the device broke
  bool driving_ GUARDED_BY(mu_) = false;
  Status broken_ GUARDED_BY(mu_);       // sticky once set: every call fails with it
  std::string last_error_ GUARDED_BY(mu_);  // libnbd's message when the driving failed
  bool connected_ GUARDED_BY(mu_) = false;  // handshake done, not closing: breaks are logged
};

Result<std::unique_ptr<NbdConnection>> NbdConnection::Open(const std::string& uri,
                                                           std::chrono::milliseconds timeout) {
  Clock::time_point deadline = Clock::now() + timeout;
  int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake < 0) return Status::Error(errno, ErrnoMessage(uri + ": eventfd", errno));
  nbd_handle* h = nbd_create();
  if (h == nullptr) {
    close(wake);
    return NbdError(ENOMEM, uri + ": cannot create a libnbd handle");
  }
  std::unique_ptr<NbdConnection> conn(new NbdConnection(uri, timeout, h, wake));
  if (nbd_supports_uri(h) != 1)
    return Status::NotSupported(uri + ": this libnbd was built without NBD URI support");
  if (nbd_set_handle_name(h, "qcowfs") == -1 ||
      nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    return NbdError(EINVAL, uri + ": cannot set up the libnbd handle");
  if (nbd_aio_connect_uri(h, uri.c_str()) == -1) return NbdError(EINVAL, uri + ": cannot connect");
  RETURN_IF_ERROR(conn->Handshake(deadline));
  return conn;
}

Status NbdConnection::Handshake(Clock::time_point deadline) {
  MutexLock l(&mu_);
  while (nbd_aio_is_ready(h_) != 1) {
    if (!broken_.ok() || Dead()) {
      int err = broken_.ok() ? ECONNRESET : broken_.err();
      return Status::Error(err, uri_ + ": cannot connect: " +
                                    (last_error_.empty() ? "the server closed the connection"
                                                         : last_error_));
    }
    if (Clock::now() >= deadline) {
      Break(Status::Error(ETIMEDOUT, uri_ + ": connect timed out"));
      return Status::Error(ETIMEDOUT, uri_ + ": no NBD handshake from the server within " +
                                          std::to_string(timeout_.count()) + " ms");
    }
    DriveOnce(deadline);
  }
  connected_ = true;
  // A larger send buffer lets a 1 MiB write leave in one or two rounds of the driver
  // instead of five or more (the default is ~208 KiB; the kernel caps the request at
  // net.core.wmem_max). Best effort: the default works, only slower.
  int fd = nbd_aio_get_fd(h_);
  int want = 4 << 20;
  if (fd >= 0) (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof(want));
  return Status::Ok();
}

NbdConnection::~NbdConnection() {
  {
    MutexLock l(&mu_);
    connected_ = false;  // the server's closing the connection is expected now: no log
    // Politely say goodbye (NBD_CMD_DISC) if the connection is healthy, but never wait for
    // a server that does not answer for longer than one request would.
    if (broken_.ok() && nbd_aio_is_ready(h_) == 1 && nbd_aio_disconnect(h_, 0) == 0) {
      Clock::time_point deadline = Clock::now() + timeout_;
      while (broken_.ok() && !Dead() && Clock::now() < deadline) DriveOnce(deadline);
    }
  }
  nbd_close(h_);  // never blocks: closes the socket and frees what is left
}

Status NbdConnection::Run(const std::string& what, const Submit& submit) {
  MutexLock l(&mu_);
  if (!broken_.ok()) return broken_;
  Clock::time_point deadline = Clock::now() + timeout_;
  int64_t cookie = submit(h_);
  if (cookie == -1) {
    Status st = NbdError(EIO, uri_ + ": " + what);
    BreakIfDead();
    return st;
  }
  if (driving_) Kick();  // the driver polls with a direction from before this command
  return Await(cookie, deadline, what);
}

Status NbdConnection::Await(int64_t cookie, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    int r = nbd_aio_command_completed(h_, static_cast<uint64_t>(cookie));
    if (r == 1) return Status::Ok();
    if (r == -1) {
      // The command failed: a server error (the connection goes on), or the connection
      // died (libnbd fails every command in flight; it may die while sending, unseen).
      Status st = NbdError(EIO, uri_ + ": " + what);
      BreakIfDead();
      return st;
    }
    // Still in flight. After a break nobody drives, so it never completes.
    if (!broken_.ok()) return broken_;
    if (Clock::now() >= deadline) {
      std::string late = what + " got no reply within " + std::to_string(timeout_.count()) + " ms";
      Break(Status::Error(ETIMEDOUT, uri_ + ": the connection was closed: " + late));
      return Status::Error(ETIMEDOUT, uri_ + ": " + late + "; closing the connection");
    }
    if (!driving_) {
      DriveOnce(deadline);
    } else {
      WaitUntil(deadline);
    }
  }
}

void NbdConnection::DriveOnce(Clock::time_point deadline) {
  int fd = nbd_aio_get_fd(h_);
  unsigned dir = nbd_aio_get_direction(h_);
  if (fd < 0 || dir == 0) {
    // Nothing to wait for on the socket: the connection has ended.
    Break(Status::Error(ENOTCONN, uri_ + ": connection lost" +
                                      (last_error_.empty() ? "" : ": " + last_error_)));
    return;
  }
  short events = 0;
  if (dir & LIBNBD_AIO_DIRECTION_READ) events |= POLLIN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) events |= POLLOUT;
  struct pollfd fds[2] = {{fd, events, 0}, {wake_.get(), POLLIN, 0}};
  auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
  int ms = static_cast<int>(std::clamp<decltype(left)>(left, 0, INT_MAX));

  driving_ = true;
  mu_.Unlock();
  int n = poll(fds, 2, ms);
  if (n > 0 && (fds[1].revents & POLLIN)) {
    uint64_t v;
    ssize_t rd = read(wake_.get(), &v, sizeof(v));
    (void)rd;  // EAGAIN: someone else drained it
  }
  mu_.Lock();
  driving_ = false;

  short rev = n > 0 ? fds[0].revents : 0;
  if ((rev & POLLNVAL) && broken_.ok()) {
    Break(Status::Error(ENOTCONN, uri_ + ": connection lost: its socket was closed"));
  } else if (rev != 0 && broken_.ok()) {
    // Ask for the direction again: a submitter may have moved the state machine on while
    // mu_ was released, and libnbd refuses a notification its state does not expect.
    unsigned now_dir = nbd_aio_get_direction(h_);
    int rc = 0;
    if ((rev & (POLLIN | POLLHUP | POLLERR)) && (now_dir & LIBNBD_AIO_DIRECTION_READ)) {
      rc = nbd_aio_notify_read(h_);
    } else if ((rev & (POLLOUT | POLLHUP | POLLERR)) && (now_dir & LIBNBD_AIO_DIRECTION_WRITE)) {
      rc = nbd_aio_notify_write(h_);
    }
    if (rc == -1 || Dead()) {
      const char* msg = rc == -1 ? nbd_get_error() : nullptr;
      int err = rc == -1 ? nbd_get_errno() : 0;
      last_error_ = msg && *msg ? msg : "the server closed the connection";
      Break(Status::Error(err > 0 ? err : ENOTCONN, uri_ + ": connection lost: " + last_error_));
    }
  }
  cv_.notify_all();  // waiters check their command; one of them drives next
}

void NbdConnection::Break(Status why) {
  if (!broken_.ok()) return;
  broken_ = std::move(why);
  if (connected_) QCOWFS_LOG(Warn, "%s", broken_.message().c_str());
  // Tell the server at once; libnbd notices only if driven, and it never is again.
  int fd = nbd_aio_get_fd(h_);
  if (fd >= 0) shutdown(fd, SHUT_RDWR);
  Kick();
  cv_.notify_all();
}

void NbdConnection::BreakIfDead() {
  if (!broken_.ok() || !Dead()) return;
  const char* msg = nbd_get_error();
  last_error_ = msg && *msg ? msg : "the server closed the connection";
  Break(Status::Error(ENOTCONN, uri_ + ": connection lost: " + last_error_));
}

void NbdConnection::Abort() {
  MutexLock l(&mu_);
  Break(Status::Error(ECANCELED, uri_ + ": cancelled; the connection was closed"));
}

void NbdConnection::Post(const Submit& submit) {
  MutexLock l(&mu_);
  if (!broken_.ok()) return;
  if (submit(h_) == -1) {
    BreakIfDead();
    return;
  }
  if (driving_) Kick();
}

void NbdConnection::Kick() {
  uint64_t one = 1;
  ssize_t wr = write(wake_.get(), &one, sizeof(one));
  (void)wr;  // EAGAIN: the counter is already non-zero, the driver will wake
}

// --- NbdDevice ---------------------------------------------------------------------------

NbdDevice::NbdDevice(std::unique_ptr<NbdConnection> conn, std::string uri, uint64_t size,
                     uint64_t min_block, uint64_t max_io, bool can_zero, bool can_flush,
                     bool can_block_status)
    : conn_(std::move(conn)),
      uri_(std::move(uri)),
      size_(size),
      min_block_(min_block),
      max_io_(max_io),
      can_zero_(can_zero),
      can_flush_(can_flush),
      can_block_status_(can_block_status) {}

NbdDevice::~NbdDevice() = default;

Result<std::unique_ptr<NbdDevice>> NbdDevice::Connect(const std::string& uri,
                                                      std::chrono::milliseconds timeout) {
  ASSIGN_OR_RETURN(std::unique_ptr<NbdConnection> conn, NbdConnection::Open(uri, timeout));
  nbd_handle* h = conn->handle();
  int ro = nbd_is_read_only(h);
  if (ro == -1) return NbdError(EIO, uri + ": cannot read the export flags");
  if (ro == 1) {
    return Status::ReadOnly(uri + ": the NBD export is read-only; a writable export is needed");
  }
  int64_t size = nbd_get_size(h);
  if (size < 0) return NbdError(EIO, uri + ": cannot get the export size");
  int zero = nbd_can_zero(h);
  int flush = nbd_can_flush(h);
  int status = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  int64_t min = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
  int64_t max = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
  if (zero < 0 || flush < 0 || status < 0 || min < 0 || max < 0)
    return NbdError(EIO, uri + ": cannot read the export's properties");
  uint64_t usize = static_cast<uint64_t>(size);
  if (min == 0) min = (status == 1 || usize % 512 != 0) ? 1 : 512;
  uint64_t umin = static_cast<uint64_t>(min);
  if ((umin & (umin - 1)) != 0 || umin > 64 * 1024) {
    return Status::Error(EPROTO, uri + ": the server's minimum block size " +
                                     std::to_string(umin) + " is not a power of two up to 64K");
  }
  if (usize % umin != 0) {
    return Status::Invalid(uri + ": the export size " + std::to_string(usize) +
                           " is not a multiple of its minimum block size " +
                           std::to_string(umin) + "; its last bytes could not be written");
  }
  uint64_t max_io = max == 0 ? kMaxIo : std::min<uint64_t>(static_cast<uint64_t>(max), kMaxIo);
  max_io = std::max(max_io & ~(umin - 1), umin);
  if (flush != 1) {
    QCOWFS_LOG(Warn, "%s: the NBD server cannot flush; the target's durability is unknown",
               uri.c_str());
  }
  QCOWFS_LOG(Debug, "%s: connected: size %llu, block %llu..%llu, zero %d, flush %d, status %d",
             uri.c_str(), static_cast<unsigned long long>(usize),
             static_cast<unsigned long long>(umin), static_cast<unsigned long long>(max_io),
             zero, flush, status);
  return std::unique_ptr<NbdDevice>(new NbdDevice(std::move(conn), uri, usize, umin, max_io,
                                                  zero == 1, flush == 1, status == 1));
}

void NbdDevice::Abort() { conn_->Abort(); }

Status NbdDevice::ReadAligned(uint64_t offset, void* buf, uint64_t len) {
  return conn_->Run(What("read", offset, len), [&](nbd_handle* h) {
    return nbd_aio_pread(h, buf, len, offset, NBD_NULL_COMPLETION, 0);
  });
}

Status NbdDevice::WriteAligned(uint64_t offset, const void* buf, uint64_t len) {
  return conn_->Run(What("write", offset, len), [&](nbd_handle* h) {
    return nbd_aio_pwrite(h, buf, len, offset, NBD_NULL_COMPLETION, 0);
  });
}

Status NbdDevice::ZeroAligned(uint64_t offset, uint64_t len, bool may_unmap) {
  if (!can_zero_) return WriteAligned(offset, kZeros, len);
  uint32_t flags = may_unmap ? 0 : LIBNBD_CMD_FLAG_NO_HOLE;
  return conn_->Run(What(may_unmap ? "write-zeroes (may unmap)" : "write-zeroes", offset, len),
                    [&](nbd_handle* h) {
                      return nbd_aio_zero(h, len, offset, NBD_NULL_COMPLETION, flags);
                    });
}

Status NbdDevice::Read(uint64_t offset, void* buf, size_t len) {
  if (offset > size_ || len > size_ - offset) {
    return Status::Invalid(uri_ + ": " + What("read", offset, len) +
                           " is beyond the end of the export (" + std::to_string(size_) + ")");
  }
  uint8_t* p = static_cast<uint8_t*>(buf);
  std::vector<uint8_t> bounce;
  while (len > 0) {
    uint64_t block = AlignDown(offset);
    if (offset != block || len < min_block_) {
      // A partial block: read all of it.
      bounce.resize(min_block_);
      RETURN_IF_ERROR(ReadAligned(block, bounce.data(), min_block_));
      uint64_t n = std::min<uint64_t>(len, block + min_block_ - offset);
      memcpy(p, bounce.data() + (offset - block), n);
      p += n;
      offset += n;
      len -= n;
      continue;
    }
    uint64_t n = std::min(AlignDown(len), max_io_);
    RETURN_IF_ERROR(ReadAligned(offset, p, n));
    p += n;
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

Status NbdDevice::CheckWriteRange(uint64_t offset, uint64_t len) const {
  if (offset > size_ || len > size_ - offset) {
    return Status::NoSpace(uri_ + ": " + What("write", offset, len) +
                           " is beyond the end of the export (" + std::to_string(size_) + ")");
  }
  return Status::Ok();
}

Status NbdDevice::Write(uint64_t offset, const void* buf, size_t len) {
  RETURN_IF_ERROR(CheckWriteRange(offset, len));
  if (len == 0) return Status::Ok();
  const uint8_t* data = static_cast<const uint8_t*>(buf);
  if (Aligned(offset) && Aligned(len)) {
    ReaderLock l(&rmw_mu_);
    return WriteLocked(offset, data, len, false);
  }
  WriterLock l(&rmw_mu_);
  return WriteLocked(offset, data, len, false);
}

Status NbdDevice::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  RETURN_IF_ERROR(CheckWriteRange(offset, len));
  if (len == 0) return Status::Ok();
  if (Aligned(offset) && Aligned(len)) {
    ReaderLock l(&rmw_mu_);
    return WriteLocked(offset, nullptr, len, may_unmap);
  }
  WriterLock l(&rmw_mu_);
  return WriteLocked(offset, nullptr, len, may_unmap);
}

Status NbdDevice::WriteLocked(uint64_t offset, const uint8_t* data, uint64_t len,
                              bool may_unmap) {
  while (len > 0) {
    uint64_t block = AlignDown(offset);
    uint64_t n;
    if (offset != block || len < min_block_) {
      n = std::min<uint64_t>(len, block + min_block_ - offset);
      RETURN_IF_ERROR(ReadModifyWrite(block, offset - block, data, n));
    } else if (data != nullptr) {
      n = std::min(AlignDown(len), max_io_);
      RETURN_IF_ERROR(WriteAligned(offset, data, n));
    } else {
      // Without WRITE_ZEROES, zero data goes out one kZeroChunk at a time.
      uint64_t cap = can_zero_ ? kMaxZero : std::min(kZeroChunk, max_io_);
      n = std::min(AlignDown(len), cap);
      RETURN_IF_ERROR(ZeroAligned(offset, n, may_unmap));
    }
    if (data != nullptr) data += n;
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

Status NbdDevice::ReadModifyWrite(uint64_t block_off, uint64_t skip, const void* data,
                                  uint64_t len) {
  std::vector<uint8_t> block(min_block_);
  RETURN_IF_ERROR(ReadAligned(block_off, block.data(), min_block_));
  if (data != nullptr) {
    memcpy(block.data() + skip, data, len);
  } else {
    memset(block.data() + skip, 0, len);
  }
  return WriteAligned(block_off, block.data(), min_block_);
}

Status NbdDevice::Discard(uint64_t offset, uint64_t len) {
  // Never NBD TRIM: a server may ignore it and keep the old data, and a discarded range
  // must read zeros (SPEC §6). Write-zeroes that may unmap frees space where it can.
  if (offset >= size_) return Status::Ok();
  return WriteZeroes(offset, std::min(len, size_ - offset), true);
}

Status NbdDevice::Flush() {
  if (!can_flush_) return Status::Ok();
  return conn_->Run("flush", [](nbd_handle* h) {
    return nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
  });
}

namespace {
// A completion callback that asks libnbd to retire the command at once (returns 1).
int RetireAtOnce(void*, int*) { return 1; }
}  // namespace

void NbdDevice::StartWriteback() {
  // An NBD FLUSH nobody waits for: the server starts writing what it holds while the copy
  // goes on. Its result does not matter; the Flush() that counts comes later and waits.
  if (!can_flush_) return;
  conn_->Post([](nbd_handle* h) {
    nbd_completion_callback cb{};
    cb.callback = RetireAtOnce;
    return nbd_aio_flush(h, cb, 0);
  });
}

namespace {

// What a block-status reply said about the first extent of the base:allocation context.
struct Extent {
  bool seen = false;
  uint64_t length = 0;
  uint32_t flags = 0;
};

int OnExtents(void* user_data, const char* metacontext, uint64_t /*offset*/,
              uint32_t* entries, size_t nr_entries, int* /*error*/) {
  auto* e = static_cast<Extent*>(user_data);
  if (e->seen || nr_entries < 2 || strcmp(metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  e->seen = true;
  e->length = entries[0];
  e->flags = entries[1];
  return 0;
}

}  // namespace

Result<BlockStatus> NbdDevice::GetBlockStatus(uint64_t offset, uint64_t len) {
  if (offset >= size_ || len == 0) {
    return Status::Invalid(uri_ + ": block status at " + Hex(offset) + " (" +
                           std::to_string(len) + " bytes) is beyond the end of the export");
  }
  len = std::min(len, size_ - offset);
  if (!can_block_status_) return BlockStatus{ExtentType::kData, len};
  if (!Aligned(offset)) {
    // A partial block is reported as data; the next call starts aligned.
    return BlockStatus{ExtentType::kData, std::min(len, AlignDown(offset) + min_block_ - offset)};
  }
  uint64_t query = std::min(len, kMaxStatusQuery);
  query = (query + min_block_ - 1) & ~(min_block_ - 1);  // <= size_: size_ is aligned
  Extent e;
  RETURN_IF_ERROR(conn_->Run(What("block status", offset, query), [&](nbd_handle* h) {
    nbd_extent_callback cb = {.callback = OnExtents, .user_data = &e, .free = nullptr};
    return nbd_aio_block_status(h, query, offset, cb, NBD_NULL_COMPLETION,
                                LIBNBD_CMD_FLAG_REQ_ONE);
  }));
  if (!e.seen || e.length == 0) return BlockStatus{ExtentType::kData, len};
  uint64_t n = std::min<uint64_t>(e.length, len);
  bool hole = e.flags & LIBNBD_STATE_HOLE;
  bool zero = e.flags & LIBNBD_STATE_ZERO;
  ExtentType type = hole && zero ? ExtentType::kUnallocated
                    : zero       ? ExtentType::kZero
                                 : ExtentType::kData;
  return BlockStatus{type, n};
}

Status NbdDevice::Allocate(uint64_t offset, uint64_t len) {
  // NBD has no preallocation and the export's size is fixed: only the range is checked.
  return CheckWriteRange(offset, len);
}

Status NbdDevice::Resize(uint64_t new_size) {
  if (new_size == size_) return Status::Ok();
  return Status::NotSupported(uri_ + ": cannot resize an NBD export (its size is " +
                              std::to_string(size_) + ")");
}

}  // namespace qcowfs::block
