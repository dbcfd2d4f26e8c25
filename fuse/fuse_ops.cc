#include "fuse/fuse_ops.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <string>
#include <vector>
#include <cstring>
#include <memory>
#include <new>

#include "fuse/fuse_server.h"
#include "fuse/kernel_io.h"
#include "util/log.h"

namespace qcowfs::fuse {
namespace {

constexpr double kAttrTimeout = 1.0;
constexpr size_t kMaxIo = 1 << 20;

FuseServer* Server(fuse_req_t req) { return static_cast<FuseServer*>(fuse_req_userdata(req)); }

int ToErrno(const Status& s) {
  int e = s.err();
  return (e > 0 && e < 4096) ? e : EIO;
}

int Errno0(const Status& s) { return s.ok() ? 0 : ToErrno(s); }

// Export for an inode, or nullptr for the root directory / unknown inodes.
Export* ExportOf(FuseServer* srv, fuse_ino_t ino) {
  const auto& ex = srv->exports();
  if (srv->file_mode()) return ino == FUSE_ROOT_ID ? ex[0] : nullptr;
  if (ino >= 2 && ino - 2 < ex.size()) return ex[ino - 2];
  return nullptr;
}

fuse_ino_t InodeOf(FuseServer* srv, size_t index) {
  return srv->file_mode() ? FUSE_ROOT_ID : static_cast<fuse_ino_t>(index + 2);
}

void FillAttr(FuseServer* srv, fuse_ino_t ino, struct stat* st) {
  std::memset(st, 0, sizeof(*st));
  st->st_ino = ino;
  Export* e = ExportOf(srv, ino);
  if (!e) {  // root directory
    const struct stat& mp = srv->mountpoint_stat();
    st->st_mode = S_IFDIR | 0755;
    st->st_nlink = 2;
    st->st_uid = mp.st_uid;
    st->st_gid = mp.st_gid;
    st->st_atim = mp.st_atim;
    st->st_mtim = mp.st_mtim;
    st->st_ctim = mp.st_ctim;
    return;
  }
  struct stat img {};
  ::fstat(e->image_fd, &img);  // never a path: it may lie under this mount
  mode_t perm = img.st_mode & 07777;
  if (perm == 0) perm = 0600;
  if (e->read_only) perm &= ~0222;
  st->st_mode = S_IFREG | perm;
  st->st_nlink = 1;
  st->st_uid = img.st_uid;
  st->st_gid = img.st_gid;
  st->st_size = static_cast<off_t>(e->dev->Size());
  st->st_blocks = static_cast<blkcnt_t>(e->dev->AllocatedBytes() / 512);
  st->st_blksize = 65536;
  st->st_atim = img.st_atim;
  st->st_mtim = img.st_mtim;
  st->st_ctim = img.st_ctim;
}

// Counts a request in flight for status.
class InFlight {
 public:
  explicit InFlight(Export* e) : e_(e) { e_->in_flight.fetch_add(1, std::memory_order_relaxed); }
  ~InFlight() { e_->in_flight.fetch_sub(1, std::memory_order_relaxed); }

 private:
  Export* e_;
};

struct AlignedFree {
  void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t(4096)); }
};

// One page-aligned 1 MiB buffer per worker thread for read replies.
uint8_t* ThreadBuffer() {
  thread_local std::unique_ptr<uint8_t[], AlignedFree> buf;
  if (!buf) buf.reset(new (std::align_val_t(4096)) uint8_t[kMaxIo]);
  return buf.get();
}

template <typename F>
void Guard(fuse_req_t req, F&& f) noexcept {
  try {
    f();
  } catch (const std::bad_alloc&) {
    fuse_reply_err(req, ENOMEM);
  } catch (...) {
    fuse_reply_err(req, EIO);
  }
}

void OpInit(void* userdata, fuse_conn_info* conn) {
  (void)userdata;
  conn->max_write = kMaxIo;
  conn->max_read = kMaxIo;
  conn->max_readahead = kMaxIo;
  if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC) conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
  conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

void OpLookup(fuse_req_t req, fuse_ino_t parent, const char* name) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    if (srv->file_mode() || parent != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOENT);
    const auto& ex = srv->exports();
    for (size_t i = 0; i < ex.size(); i++) {
      if (ex[i]->name == name) {
        fuse_entry_param ep {};
        ep.ino = InodeOf(srv, i);
        ep.attr_timeout = kAttrTimeout;
        ep.entry_timeout = kAttrTimeout;
        FillAttr(srv, ep.ino, &ep.attr);
        return (void)fuse_reply_entry(req, &ep);
      }
    }
    fuse_reply_err(req, ENOENT);
  });
}

void OpGetattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    if (ino != FUSE_ROOT_ID && !ExportOf(srv, ino)) return (void)fuse_reply_err(req, ENOENT);
    struct stat st;
    FillAttr(srv, ino, &st);
    fuse_reply_attr(req, &st, kAttrTimeout);
  });
}

void OpSetattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int to_set, fuse_file_info*) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    Export* e = ExportOf(srv, ino);
    if (!e) return (void)fuse_reply_err(req, ino == FUSE_ROOT_ID ? EPERM : ENOENT);
    if (to_set & FUSE_SET_ATTR_SIZE) {
      if (e->read_only) return (void)fuse_reply_err(req, EROFS);
      uint64_t want = static_cast<uint64_t>(attr->st_size);
      uint64_t cur = e->dev->Size();
      if (want < cur) return (void)fuse_reply_err(req, EPERM);  // never shrink
      if (want > cur) {
        InFlight f(e);
        Status s = e->dev->Resize(want);
        if (!s.ok()) return (void)fuse_reply_err(req, ToErrno(s));
      }
    }
    if ((to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) && e->read_only)
      return (void)fuse_reply_err(req, EROFS);
    struct stat st;
    FillAttr(srv, ino, &st);
    fuse_reply_attr(req, &st, kAttrTimeout);
  });
}

void OpOpen(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e) return (void)fuse_reply_err(req, ino == FUSE_ROOT_ID ? EISDIR : ENOENT);
    if (e->read_only && (fi->flags & O_ACCMODE) != O_RDONLY) return (void)fuse_reply_err(req, EROFS);
    // O_TRUNC is ignored: the image never shrinks and opening must not destroy data.
    fi->direct_io = 1;
    fi->keep_cache = 0;
    fuse_reply_open(req, fi);
  });
}

void OpRead(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e) return (void)fuse_reply_err(req, EISDIR);
    InFlight f(e);
    e->reads.fetch_add(1, std::memory_order_relaxed);
    uint64_t dsize = e->dev->Size();
    if (off < 0) return (void)fuse_reply_err(req, EINVAL);
    if (static_cast<uint64_t>(off) >= dsize || size == 0) return (void)fuse_reply_buf(req, nullptr, 0);
    size_t n = static_cast<size_t>(std::min<uint64_t>({uint64_t{size}, dsize - static_cast<uint64_t>(off), uint64_t{kMaxIo}}));
    // A ring thread reads straight into its ring entry's reply buffer.
    uint8_t* buf = ThreadRingPayload(n);
    if (!buf) buf = ThreadBuffer();
    Status s = e->dev->Read(static_cast<uint64_t>(off), buf, n);
    if (!s.ok()) {
      QCOWFS_LOG(Warn, "read image=%s off=0x%llx len=%zu: %s", e->name.c_str(),
                 static_cast<unsigned long long>(off), n, s.message().c_str());
      return (void)fuse_reply_err(req, ToErrno(s));
    }
    fuse_reply_buf(req, reinterpret_cast<const char*>(buf), n);
  });
}

// Direct writes and writes from page writeback of a shared mapping (FUSE_WRITE_CACHE,
// fi->writepage) take the same path: same EOF rule, same engine call, same errors
// (a failed writeback makes the application's msync/fsync fail).
void OpWrite(fuse_req_t req, fuse_ino_t ino, const char* buf, size_t size, off_t off, fuse_file_info*) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e) return (void)fuse_reply_err(req, EISDIR);
    if (e->read_only) return (void)fuse_reply_err(req, EROFS);
    InFlight f(e);
    e->writes.fetch_add(1, std::memory_order_relaxed);
    uint64_t dsize = e->dev->Size();
    if (off < 0) return (void)fuse_reply_err(req, EINVAL);
    if (static_cast<uint64_t>(off) >= dsize) return (void)fuse_reply_err(req, ENOSPC);
    size_t n = static_cast<size_t>(std::min<uint64_t>(size, dsize - off));
    Status s = e->dev->Write(static_cast<uint64_t>(off), buf, n);
    if (!s.ok()) {
      QCOWFS_LOG(Warn, "write image=%s off=0x%llx len=%zu: %s", e->name.c_str(),
                 static_cast<unsigned long long>(off), n, s.message().c_str());
      return (void)fuse_reply_err(req, ToErrno(s));
    }
    fuse_reply_write(req, n);
  });
}

// close(): only descriptors that could write flush (a reader's close costs nothing).
void OpFlush(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e || e->read_only || (fi && (fi->flags & O_ACCMODE) == O_RDONLY)) return (void)fuse_reply_err(req, 0);
    InFlight f(e);
    e->flushes.fetch_add(1, std::memory_order_relaxed);
    fuse_reply_err(req, Errno0(e->dev->Flush()));
  });
}

void OpFsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e || e->read_only) return (void)fuse_reply_err(req, 0);
    InFlight f(e);
    e->flushes.fetch_add(1, std::memory_order_relaxed);
    fuse_reply_err(req, Errno0(e->dev->Flush()));
  });
}

void OpFallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, fuse_file_info*) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e) return (void)fuse_reply_err(req, EISDIR);
    if (off < 0 || len <= 0) return (void)fuse_reply_err(req, EINVAL);
    const bool keep = mode & FALLOC_FL_KEEP_SIZE;
    const int kind = mode & ~FALLOC_FL_KEEP_SIZE;
    if (kind != 0 && kind != FALLOC_FL_PUNCH_HOLE && kind != FALLOC_FL_ZERO_RANGE)
      return (void)fuse_reply_err(req, EOPNOTSUPP);
    if (kind == FALLOC_FL_PUNCH_HOLE && !keep) return (void)fuse_reply_err(req, EOPNOTSUPP);
    if (e->read_only) return (void)fuse_reply_err(req, EROFS);
    InFlight f(e);
    uint64_t start = static_cast<uint64_t>(off), end = start + static_cast<uint64_t>(len);
    uint64_t size = e->dev->Size();
    if (!keep && end > size) {  // mode 0 and ZERO_RANGE grow the file like truncate
      Status s = e->dev->Resize(end);
      if (!s.ok()) return (void)fuse_reply_err(req, ToErrno(s));
      size = end;
    }
    if (start >= size) return (void)fuse_reply_err(req, 0);
    end = std::min(end, size);
    Status s;
    if (kind == FALLOC_FL_PUNCH_HOLE) {
      e->discards.fetch_add(1, std::memory_order_relaxed);
      s = e->discard_unmap ? e->dev->Discard(start, end - start)
                           : e->dev->WriteZeroes(start, end - start, false);
    } else if (kind == FALLOC_FL_ZERO_RANGE) {
      s = e->dev->WriteZeroes(start, end - start, false);
    } else {
      s = e->dev->Allocate(start, end - start);  // mode 0: reserve, reads unchanged
    }
    // The range is changed before the reply: the kernel drops its cached (mapped) pages
    // of a punched or zeroed range once this reply arrives (it wrote dirty ones back
    // before sending the request), so mappings read the zeros from here on.
    fuse_reply_err(req, Errno0(s));
  });
}

void OpLseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence, fuse_file_info*) noexcept {
  Guard(req, [&] {
    Export* e = ExportOf(Server(req), ino);
    if (!e) return (void)fuse_reply_err(req, EISDIR);
    if (whence != SEEK_DATA && whence != SEEK_HOLE) return (void)fuse_reply_err(req, EINVAL);
    uint64_t size = e->dev->Size();
    if (off < 0 || static_cast<uint64_t>(off) >= size) return (void)fuse_reply_err(req, ENXIO);
    uint64_t pos = static_cast<uint64_t>(off);
    while (pos < size) {
      auto st = e->dev->GetBlockStatus(pos, size - pos);
      if (!st.ok()) return (void)fuse_reply_err(req, ToErrno(st.status()));
      bool data = st.value().type == block::ExtentType::kData;
      if (whence == SEEK_DATA && data) return (void)fuse_reply_lseek(req, static_cast<off_t>(pos));
      if (whence == SEEK_HOLE && !data) return (void)fuse_reply_lseek(req, static_cast<off_t>(pos));
      pos += st.value().length;
    }
    if (whence == SEEK_HOLE) return (void)fuse_reply_lseek(req, static_cast<off_t>(size));
    fuse_reply_err(req, ENXIO);
  });
}

void OpOpendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    if (srv->file_mode() || ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
    fuse_reply_open(req, fi);
  });
}

void OpReaddir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info*) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    if (srv->file_mode() || ino != FUSE_ROOT_ID) return (void)fuse_reply_err(req, ENOTDIR);
    std::vector<char> buf(size);
    size_t used = 0;
    const auto& ex = srv->exports();
    size_t total = ex.size() + 2;
    for (size_t i = static_cast<size_t>(off); i < total; i++) {
      struct stat st {};
      std::string name;
      if (i == 0) {
        name = ".";
        st.st_ino = FUSE_ROOT_ID;
        st.st_mode = S_IFDIR;
      } else if (i == 1) {
        name = "..";
        st.st_ino = FUSE_ROOT_ID;
        st.st_mode = S_IFDIR;
      } else {
        name = ex[i - 2]->name;
        st.st_ino = InodeOf(srv, i - 2);
        st.st_mode = S_IFREG;
      }
      size_t n = fuse_add_direntry(req, buf.data() + used, size - used, name.c_str(), &st,
                                   static_cast<off_t>(i + 1));
      if (n > size - used) break;
      used += n;
    }
    fuse_reply_buf(req, buf.data(), used);
  });
}

void OpStatfs(fuse_req_t req, fuse_ino_t) noexcept {
  Guard(req, [&] {
    FuseServer* srv = Server(req);
    struct statvfs sv {};
    uint64_t total = 0, used = 0;
    for (Export* e : srv->exports()) {
      total += e->dev->Size();
      used += e->dev->AllocatedBytes();
    }
    sv.f_bsize = 4096;
    sv.f_frsize = 4096;
    sv.f_blocks = total / 4096;
    sv.f_bfree = total > used ? (total - used) / 4096 : 0;
    sv.f_bavail = sv.f_bfree;
    sv.f_files = srv->exports().size() + 1;
    sv.f_namemax = 255;
    fuse_reply_statfs(req, &sv);
  });
}

// Directory entries are fixed: nothing can be created, renamed or removed.
void OpMknod(fuse_req_t req, fuse_ino_t, const char*, mode_t, dev_t) noexcept { fuse_reply_err(req, EPERM); }
void OpMkdir(fuse_req_t req, fuse_ino_t, const char*, mode_t) noexcept { fuse_reply_err(req, EPERM); }
void OpUnlink(fuse_req_t req, fuse_ino_t, const char*) noexcept { fuse_reply_err(req, EPERM); }
void OpRmdir(fuse_req_t req, fuse_ino_t, const char*) noexcept { fuse_reply_err(req, EPERM); }
void OpSymlink(fuse_req_t req, const char*, fuse_ino_t, const char*) noexcept { fuse_reply_err(req, EPERM); }
void OpRename(fuse_req_t req, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned) noexcept {
  fuse_reply_err(req, EPERM);
}
void OpLink(fuse_req_t req, fuse_ino_t, fuse_ino_t, const char*) noexcept { fuse_reply_err(req, EPERM); }
void OpCreate(fuse_req_t req, fuse_ino_t, const char*, mode_t, fuse_file_info*) noexcept {
  fuse_reply_err(req, EPERM);
}

}  // namespace

const fuse_lowlevel_ops* Operations() {
  static const fuse_lowlevel_ops ops = [] {
    fuse_lowlevel_ops o {};
    o.init = OpInit;
    o.lookup = OpLookup;
    o.getattr = OpGetattr;
    o.setattr = OpSetattr;
    o.open = OpOpen;
    o.read = OpRead;
    o.write = OpWrite;
    o.flush = OpFlush;
    o.fsync = OpFsync;
    o.fallocate = OpFallocate;
    o.lseek = OpLseek;
    o.opendir = OpOpendir;
    o.readdir = OpReaddir;
    o.statfs = OpStatfs;
    o.mknod = OpMknod;
    o.mkdir = OpMkdir;
    o.unlink = OpUnlink;
    o.rmdir = OpRmdir;
    o.symlink = OpSymlink;
    o.rename = OpRename;
    o.link = OpLink;
    o.create = OpCreate;
    return o;
  }();
  return &ops;
}

}  // namespace qcowfs::fuse
