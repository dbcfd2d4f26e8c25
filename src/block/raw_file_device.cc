#include "block/raw_file_device.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
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

}  // namespace

Result<std::unique_ptr<RawFileDevice>> RawFileDevice::Open(const std::string& path,
                                                           bool read_only, LockMode lock) {
  int fd = ::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC);
  if (fd < 0) return Status::Error(errno, ErrnoMessage(path, errno));
  UniqueFd ufd(fd);
  struct stat st;
  if (fstat(fd, &st) < 0) return Status::Error(errno, ErrnoMessage(path, errno));
  if (S_ISDIR(st.st_mode)) return Status::Error(EISDIR, path + ": is a directory");
  std::unique_ptr<RawFileDevice> dev(new RawFileDevice(path, std::move(ufd), read_only));
  RETURN_IF_ERROR(dev->AcquireLocks(lock));
  return dev;
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
  return PreadFull(fd_.get(), buf, len, offset);
}

Status RawFileDevice::Write(uint64_t offset, const void* buf, size_t len) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  return PwriteFull(fd_.get(), buf, len, offset);
}

Status RawFileDevice::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  if (len == 0) return Status::Ok();
  int mode = may_unmap ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : FALLOC_FL_ZERO_RANGE;
  uint64_t size = Size();
  if (may_unmap && offset + len > size) {
    // Punching never extends the file: extend first so the size is right.
    if (ftruncate(fd_.get(), static_cast<off_t>(offset + len)) < 0)
      return Status::Error(errno, ErrnoMessage(path_, errno));
  }
  if (fallocate(fd_.get(), mode, static_cast<off_t>(offset), static_cast<off_t>(len)) == 0)
    return Status::Ok();
  // Fall back to writing zeros.
  std::vector<char> zeros(std::min<uint64_t>(len, 1 << 20), 0);
  while (len > 0) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, zeros.size()));
    RETURN_IF_ERROR(PwriteFull(fd_.get(), zeros.data(), n, offset));
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

Status RawFileDevice::Discard(uint64_t offset, uint64_t len) {
  if (read_only_) return Status::ReadOnly(path_ + ": read-only");
  if (len == 0) return Status::Ok();
  uint64_t size = Size();
  if (offset >= size) return Status::Ok();
  if (offset + len > size) len = size - offset;
  if (fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                static_cast<off_t>(offset), static_cast<off_t>(len)) < 0) {
    if (errno == EOPNOTSUPP) return WriteZeroes(offset, len, false);
    return Status::Error(errno, ErrnoMessage(path_ + ": punch hole", errno));
  }
  return Status::Ok();
}

Status RawFileDevice::Flush() {
  if (read_only_) return Status::Ok();
  if (fdatasync(fd_.get()) < 0) return Status::Error(errno, ErrnoMessage(path_ + ": fdatasync", errno));
  return Status::Ok();
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
