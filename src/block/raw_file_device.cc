#include "block/raw_file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace qcowfs::block {
namespace {

// QEMU's lock layout (file-posix.c): byte 100+i = "holds permission i",
// byte 200+i = "does not share permission i". Permissions: 0 consistent read,
// 1 write, 2 write unchanged, 3 resize.
constexpr off_t kPermBase = 100;
constexpr off_t kSharedBase = 200;
constexpr int kPermConsistentRead = 0;
constexpr int kPermWrite = 1;
constexpr int kPermResize = 3;

const char* PermName(int perm) {
  switch (perm) {
    case 0: return "consistent read";
    case 1: return "write";
    case 2: return "write unchanged";
    default: return "resize";
  }
}

bool ByteLockedByOther(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return false;
  return fl.l_type != F_UNLCK;
}

bool LockByte(int fd, off_t byte) {
  struct flock fl {};
  fl.l_type = F_RDLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = byte;
  fl.l_len = 1;
  return fcntl(fd, F_OFD_SETLK, &fl) == 0;
}

// Drops every lock this open file description holds on the lock bytes.
void UnlockBytes(int fd) {
  for (off_t base : {kPermBase, kSharedBase}) {
    struct flock fl {};
    fl.l_type = F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = base;
    fl.l_len = 8;
    (void)fcntl(fd, F_OFD_SETLK, &fl);
  }
}

// Largest bounce buffer of one direct-mode step (bigger requests go in pieces).
constexpr uint64_t kBounceMax = 1 << 20;

// A heap buffer aligned for O_DIRECT.
class AlignedBuf {
 public:
  AlignedBuf(size_t len, size_t align) {
    if (posix_memalign(&p_, std::max<size_t>(align, sizeof(void*)), std::max<size_t>(len, 1)) != 0) p_ = nullptr;
  }
  ~AlignedBuf() { free(p_); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  uint8_t* get() const { return static_cast<uint8_t*>(p_); }

 private:
  void* p_ = nullptr;
};

// A bounce buffer for one direct-mode step: a per-thread buffer reused while requests
// are small (no allocation per FUSE request, whose payload is never aligned), a fresh one
// for big steps (so idle threads keep at most kCachedBounce each).
constexpr size_t kCachedBounce = 256 << 10;

class Bounce {
 public:
  Bounce(size_t len, size_t align) {
    thread_local std::unique_ptr<AlignedBuf> cached;
    thread_local size_t cached_align = 0;
    if (len <= kCachedBounce) {
      if (!cached || !cached->get() || cached_align < align) {
        cached = std::make_unique<AlignedBuf>(kCachedBounce, align);
        cached_align = align;
      }
      p_ = cached->get();
    } else {
      own_ = std::make_unique<AlignedBuf>(len, align);
      p_ = own_->get();
    }
  }
  uint8_t* get() const { return p_; }

 private:
  std::unique_ptr<AlignedBuf> own_;
  uint8_t* p_ = nullptr;
};

std::string DirectRefused(const std::string& path) {
  return path + ": the filesystem does not support O_DIRECT (cache=none); use --cache writeback";
}

}  // namespace

Result<std::unique_ptr<RawFileDevice>> RawFileDevice::Open(const std::string& path,
                                                           bool read_only, LockMode lock,
                                                           const DirectIo& dio) {
  int flags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (dio.enabled ? O_DIRECT : 0);
  int fd = ::open(path.c_str(), flags);
  if (fd < 0 && dio.enabled && errno == EINVAL) return Status::Error(EINVAL, DirectRefused(path));
  if (fd < 0) return Status::Error(errno, ErrnoMessage(path, errno));
  UniqueFd ufd(fd);
  struct stat st;
  if (fstat(fd, &st) < 0) return Status::Error(errno, ErrnoMessage(path, errno));
  if (S_ISDIR(st.st_mode)) return Status::Error(EISDIR, path + ": is a directory");
  std::unique_ptr<RawFileDevice> dev(new RawFileDevice(path, std::move(ufd), read_only));
  if (dio.enabled) RETURN_IF_ERROR(dev->SetUpDirect(dio));
  RETURN_IF_ERROR(dev->AcquireLocks(lock));
  return dev;
}

// The alignment O_DIRECT needs on this file: statx STATX_DIOALIGN where the kernel and
// filesystem report it, else the logical block size of a block device, else 4096 (a
// safe choice on every filesystem with 4K pages).
Status RawFileDevice::SetUpDirect(const DirectIo& dio) {
  const int fd = fd_.get();
  uint32_t off_align = 0, mem_align = 0;
  struct statx stx {};
  if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 && (stx.stx_mask & STATX_DIOALIGN) &&
      stx.stx_dio_offset_align != 0) {
    off_align = stx.stx_dio_offset_align;
    mem_align = stx.stx_dio_mem_align;
  } else if (struct stat st {}; fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    int ss = 0;
    if (ioctl(fd, BLKSSZGET, &ss) == 0 && ss > 0) off_align = static_cast<uint32_t>(ss);
  }
  if (off_align == 0 || (off_align & (off_align - 1)) != 0) off_align = 4096;
  if (mem_align == 0 || (mem_align & (mem_align - 1)) != 0) mem_align = off_align;
  if (dio.min_align > off_align && (dio.min_align & (dio.min_align - 1)) == 0) off_align = dio.min_align;
  direct_ = true;
  align_ = off_align;
  mem_align_ = mem_align;
  unsafe_no_block_lock_ = dio.unsafe_no_block_lock;
  // Some filesystems accept O_DIRECT at open and refuse the I/O: probe with one read.
  AlignedBuf probe(align_, std::max<uint32_t>(mem_align_, 4096));
  if (!probe.get()) return Status::Error(ENOMEM, path_ + ": out of memory");
  ssize_t n;
  do {
    n = ::pread(fd, probe.get(), align_, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0 && errno == EINVAL) return Status::Error(EINVAL, DirectRefused(path_));
  if (n < 0) return Status::Error(errno, ErrnoMessage(path_, errno));
  return Status::Ok();
}

// Aligned offset, length and buffer. Past the end of the file reads zeros; the file may
// end inside a host block (a short read that leaves an unaligned offset).
Status RawFileDevice::DirectPread(void* buf, size_t len, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = ::pread(fd_.get(), p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(errno, ErrnoMessage(path_ + ": read", errno));
    }
    if (n == 0 || !Aligned(off + static_cast<uint64_t>(n))) {  // end of file
      std::memset(p + n, 0, len - static_cast<size_t>(n));
      return Status::Ok();
    }
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status RawFileDevice::DirectPwrite(const void* buf, size_t len, uint64_t off) {
  const auto* p = static_cast<const uint8_t*>(buf);
  while (len > 0) {
    ssize_t n = ::pwrite(fd_.get(), p, len, static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Status::Error(errno, ErrnoMessage(path_ + ": write", errno));
    }
    if (n == 0 || !Aligned(static_cast<uint64_t>(n)))
      return Status::Error(n == 0 ? ENOSPC : EIO, path_ + ": short direct write");
    p += n;
    len -= static_cast<size_t>(n);
    off += static_cast<uint64_t>(n);
  }
  return Status::Ok();
}

Status RawFileDevice::DirectRead(uint64_t offset, void* buf, size_t len) {
  if (Aligned(offset) && Aligned(len) && MemAligned(buf)) return DirectPread(buf, len, offset);
  auto* out = static_cast<uint8_t*>(buf);
  while (len > 0) {
    const uint64_t a = AlignDown(offset);
    const uint64_t piece_end = std::min<uint64_t>(offset + len, a + std::max<uint64_t>(kBounceMax, align_));
    const uint64_t b = AlignUp(piece_end);
    Bounce bb(b - a, std::max<uint32_t>(mem_align_, 4096));
    if (!bb.get()) return Status::Error(ENOMEM, path_ + ": out of memory for a bounce buffer");
    RETURN_IF_ERROR(DirectPread(bb.get(), b - a, a));
    const uint64_t n = piece_end - offset;
    std::memcpy(out, bb.get() + (offset - a), n);
    out += n;
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

// A piece at a time (at most kBounceMax of host blocks): a piece whose first or last host
// block is partial reads those blocks, merges, and writes the aligned range back while
// holding it exclusively; an aligned piece holds its range shared (copied to an aligned
// buffer when the caller's is not).
Status RawFileDevice::DirectWrite(uint64_t offset, const void* buf, size_t len) {
  const auto* in = static_cast<const uint8_t*>(buf);
  if (Aligned(offset) && Aligned(len) && MemAligned(buf)) {
    BlockRangeLock::Guard g(range_lock(), offset, offset + len, false);
    return DirectPwrite(buf, len, offset);
  }
  while (len > 0) {
    const uint64_t a = AlignDown(offset);
    const uint64_t piece_end = std::min<uint64_t>(offset + len, a + std::max<uint64_t>(kBounceMax, align_));
    const uint64_t b = AlignUp(piece_end);
    const bool head = offset != a, tail = piece_end != b;
    Bounce bb(b - a, std::max<uint32_t>(mem_align_, 4096));
    if (!bb.get()) return Status::Error(ENOMEM, path_ + ": out of memory for a bounce buffer");
    {
      BlockRangeLock::Guard g(range_lock(), a, b, head || tail);
      if (head) RETURN_IF_ERROR(DirectPread(bb.get(), align_, a));
      if (tail && (b - align_ != a || !head)) RETURN_IF_ERROR(DirectPread(bb.get() + (b - a - align_), align_, b - align_));
      std::memcpy(bb.get() + (offset - a), in, piece_end - offset);
      RETURN_IF_ERROR(DirectPwrite(bb.get(), b - a, a));
    }
    const uint64_t n = piece_end - offset;
    in += n;
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

Status RawFileDevice::AcquireLocks(LockMode mode) {
  if (mode == LockMode::kNone) return Status::Ok();
  std::vector<int> perms = {kPermConsistentRead};
  std::vector<int> unshared = {kPermWrite, kPermResize};
  if (mode == LockMode::kExclusive) perms = {kPermConsistentRead, kPermWrite, kPermResize};
  int fd = fd_.get();
  // Take our bytes first, then look at the other side's, as QEMU does
  // (raw_apply_lock_bytes, then raw_check_lock_bytes). An OFD F_GETLK does not report
  // our own locks, and two openers racing both hold their bytes before either looks,
  // so at least one of them sees the other. Testing first would let both pass.
  auto refuse = [&](std::string msg) {
    UnlockBytes(fd);
    return Status::Error(EAGAIN, std::move(msg));
  };
  for (int p : perms) {
    if (!LockByte(fd, kPermBase + p)) return refuse(path_ + ": failed to lock image byte");
  }
  for (int p : unshared) {
    if (!LockByte(fd, kSharedBase + p)) return refuse(path_ + ": failed to lock image byte");
  }
  for (int p : perms) {
    if (ByteLockedByOther(fd, kSharedBase + p)) {
      return refuse(path_ + ": failed to get \"" + PermName(p) +
                    "\" lock: is another process using the image?");
    }
  }
  for (int p : unshared) {
    if (ByteLockedByOther(fd, kPermBase + p)) {
      return refuse(path_ + ": failed to get shared \"" + PermName(p) +
                    "\" lock: is another process using the image?");
    }
  }
  return Status::Ok();
}

Status RawFileDevice::Read(uint64_t offset, void* buf, size_t len) {
  if (direct_) return DirectRead(offset, buf, len);
  return PreadFull(fd_.get(), buf, len, offset);
}

Status RawFileDevice::Write(uint64_t offset, const void* buf, size_t len) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  if (direct_) return DirectWrite(offset, buf, len);
  return PwriteFull(fd_.get(), buf, len, offset);
}

// The fallback when the filesystem cannot zero a range: write zeros as data.
Status RawFileDevice::WriteZeroesAsData(uint64_t offset, uint64_t len) {
  const size_t chunk = static_cast<size_t>(std::min<uint64_t>(len, kBounceMax));
  AlignedBuf zeros(chunk, std::max<uint32_t>(mem_align_, 4096));
  if (!zeros.get()) return Status::Error(ENOMEM, path_ + ": out of memory");
  std::memset(zeros.get(), 0, chunk);
  while (len > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, chunk));
    RETURN_IF_ERROR(direct_ ? DirectWrite(offset, zeros.get(), n) : PwriteFull(fd_.get(), zeros.get(), n, offset));
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

Status RawFileDevice::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  if (len == 0) return Status::Ok();
  int mode = may_unmap ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : FALLOC_FL_ZERO_RANGE;
  {
    // Direct mode: ordered against a read-modify-write of the blocks it touches.
    BlockRangeLock::Guard g(direct_ ? range_lock() : nullptr, AlignDown(offset), AlignUp(offset + len), false);
    uint64_t size = Size();
    if (may_unmap && offset + len > size) {
      // Punching never extends the file: extend first so the size is right.
      if (ftruncate(fd_.get(), static_cast<off_t>(offset + len)) < 0)
        return Status::Error(errno, ErrnoMessage(path_, errno));
    }
    if (fallocate(fd_.get(), mode, static_cast<off_t>(offset), static_cast<off_t>(len)) == 0)
      return Status::Ok();
  }
  return WriteZeroesAsData(offset, len);
}

Status RawFileDevice::Discard(uint64_t offset, uint64_t len) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  if (len == 0) return Status::Ok();
  {
    BlockRangeLock::Guard g(direct_ ? range_lock() : nullptr, AlignDown(offset), AlignUp(offset + len), false);
    uint64_t size = Size();
    if (offset >= size) return Status::Ok();
    if (offset + len > size) len = size - offset;
    if (fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(offset), static_cast<off_t>(len)) == 0)
      return Status::Ok();
    if (errno != EOPNOTSUPP) return Status::Error(errno, ErrnoMessage(path_ + ": punch hole", errno));
  }
  return WriteZeroes(offset, len, false);
}

Status RawFileDevice::Flush() {
  if (read_only_) return Status::Ok();
  if (fdatasync(fd_.get()) < 0) return Status::Error(errno, ErrnoMessage(path_ + ": fdatasync", errno));
  return Status::Ok();
}

void RawFileDevice::StartWriteback() {
  if (read_only_) return;
  (void)sync_file_range(fd_.get(), 0, 0, SYNC_FILE_RANGE_WRITE);
}

Result<BlockStatus> RawFileDevice::GetBlockStatus(uint64_t offset, uint64_t len) {
  uint64_t size = Size();
  if (offset >= size) return BlockStatus{ExtentType::kZero, len};
  uint64_t end = std::min(size, offset + len);
  off_t data = lseek(fd_.get(), static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) return BlockStatus{ExtentType::kZero, end - offset};
    return BlockStatus{ExtentType::kData, end - offset};
  }
  if (static_cast<uint64_t>(data) > offset)
    return BlockStatus{ExtentType::kZero, std::min<uint64_t>(data, end) - offset};
  off_t hole = lseek(fd_.get(), static_cast<off_t>(offset), SEEK_HOLE);
  uint64_t h = hole < 0 ? end : std::min<uint64_t>(hole, end);
  if (h <= offset) h = end;
  return BlockStatus{ExtentType::kData, h - offset};
}

uint64_t RawFileDevice::Size() const {
  struct stat st;
  if (fstat(fd_.get(), &st) < 0) return 0;
  return static_cast<uint64_t>(st.st_size);
}

Status RawFileDevice::Resize(uint64_t new_size) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  // Direct mode: no read-modify-write of a block past the new end may put it back.
  BlockRangeLock::Guard g(direct_ ? range_lock() : nullptr, AlignDown(std::min(new_size, Size())), UINT64_MAX, true);
  if (ftruncate(fd_.get(), static_cast<off_t>(new_size)) < 0)
    return Status::Error(errno, ErrnoMessage(path_ + ": truncate", errno));
  return Status::Ok();
}

Status RawFileDevice::Allocate(uint64_t offset, uint64_t len) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  // Mode 0: the file grows to cover the range, like writing zeros would.
  if (fallocate(fd_.get(), 0, static_cast<off_t>(offset), static_cast<off_t>(len)) == 0) return Status::Ok();
  if (errno != EOPNOTSUPP) return Status::Error(errno, ErrnoMessage(path_ + ": fallocate", errno));
  if (Size() < offset + len && ftruncate(fd_.get(), static_cast<off_t>(offset + len)) < 0)
    return Status::Error(errno, ErrnoMessage(path_ + ": truncate", errno));
  return Status::Ok();
}

uint64_t RawFileDevice::AllocatedBytes() const {
  struct stat st;
  if (fstat(fd_.get(), &st) < 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace qcowfs::block
