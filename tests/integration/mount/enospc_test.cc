// A host filesystem that fills up, through the real mount (issue 9 items 2 and 10): the
// image lives on a small tmpfs. Writes that need space fail with ENOSPC; reads never
// fail; punch-hole still gives space back; once space is free, fsync succeeds and
// nothing acknowledged is lost; qemu-img check is clean at the end. A dirty
// lazy-refcounts image on a full host is refused with one line and left unchanged, and
// repaired once there is space.
#include <doctest/doctest.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/mount.h>

#include <sstream>
#include <string>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

// A tmpfs of `size` mounted on a fresh directory, unmounted (lazily) at the end.
class SmallHost {
 public:
  SmallHost(const Scratch& s, const std::string& size) : dir_(s.File("host")) {
    REQUIRE(::mkdir(dir_.c_str(), 0755) == 0);
    Must({"mount", "-t", "tmpfs", "-o", "size=" + size, "qcowfs-test-host", dir_});
    mounted_ = true;
  }
  ~SmallHost() {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
  }
  std::string File(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
  bool mounted_ = false;
};

uint8_t Pat(uint64_t off, uint8_t salt) { return static_cast<uint8_t>((off >> 12) * 7 + salt); }

std::vector<uint8_t> Block(uint64_t off, uint64_t len, uint8_t salt) {
  std::vector<uint8_t> b(len);
  for (uint64_t i = 0; i < len; i += 4096) std::fill(b.begin() + i, b.begin() + std::min(len, i + 4096), Pat(off + i, salt));
  return b;
}

// Fills the filesystem with a file until a write fails with ENOSPC, then leaves `spare`
// bytes free again.
void FillUp(const std::string& path, uint64_t spare) {
  Fd fd(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
  REQUIRE(fd.valid());
  std::vector<uint8_t> b(64 * KiB, 1);
  uint64_t off = 0;
  for (;;) {
    ssize_t n = ::pwrite(fd.get(), b.data(), b.size(), static_cast<off_t>(off));
    if (n <= 0) break;
    off += static_cast<uint64_t>(n);
  }
  REQUIRE(errno == ENOSPC);
  REQUIRE(off > spare);
  REQUIRE(::ftruncate(fd.get(), static_cast<off_t>(off - spare)) == 0);
}

}  // namespace

TEST_CASE("mount enospc: a full host fails writes with ENOSPC; punch, fsync and reads go on; nothing acknowledged is lost") {
  RequireMountTools();
  Scratch s;
  SmallHost host(s, "24m");
  std::string img = host.File("img.qcow2"), mp = s.FileMountpoint();
  // 4K clusters: the host fills up while new L2 tables (every 2 MiB of guest) and new
  // refcount blocks (every 8 MiB of host) are still being linked.
  QemuImgCreate(img, "64M", "cluster_size=4k");
  const uint64_t kChunk = 1 * MiB;
  uint64_t acked_end = 0, failed_at = 0;
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDWR);
    REQUIRE(fd.valid());
    for (uint64_t off = 0; off < 8 * MiB; off += kChunk) REQUIRE(PwriteAll(fd.get(), Block(off, kChunk, 1).data(), kChunk, off));
    REQUIRE(::fsync(fd.get()) == 0);
    // Fill the host through the mount.
    int err = 0;
    for (uint64_t off = 8 * MiB; off < 64 * MiB; off += kChunk) {
      std::vector<uint8_t> b = Block(off, kChunk, 1);
      ssize_t n = ::pwrite(fd.get(), b.data(), kChunk, static_cast<off_t>(off));
      if (n != static_cast<ssize_t>(kChunk)) {
        err = n < 0 ? errno : 0;
        failed_at = off;
        break;
      }
      acked_end = off + kChunk;
    }
    INFO("filled to " << acked_end);
    REQUIRE(failed_at != 0);
    CHECK(err == ENOSPC);
    REQUIRE(acked_end > 16 * MiB);
    // Reads never fail because the host is full.
    std::vector<uint8_t> r(kChunk);
    for (uint64_t off = 0; off < acked_end; off += kChunk) {
      REQUIRE(PreadAll(fd.get(), r.data(), kChunk, off));
      REQUIRE_MESSAGE(r == Block(off, kChunk, 1), "wrong data at " << off);
    }
    // Everything acknowledged can be made durable: its metadata has its space.
    CHECK(::fsync(fd.get()) == 0);
    // Punch gives space back at once.
    uint64_t before = AllocatedBytesOf(img);
    REQUIRE(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * MiB, 8 * MiB) == 0);
    uint64_t after = AllocatedBytesOf(img);
    INFO("host bytes before punch " << before << ", after " << after);
    CHECK(before - after >= 7 * MiB);
    REQUIRE(::fsync(fd.get()) == 0);
    for (uint64_t off = 8 * MiB; off < 12 * MiB; off += kChunk) REQUIRE(PwriteAll(fd.get(), Block(off, kChunk, 2).data(), kChunk, off));
    REQUIRE(::fsync(fd.get()) == 0);
    fd.Close();
    CHECK_UNMOUNTS(g);
  }
  CheckClean(img);
  // Everything acknowledged reads back after a remount.
  MountGuard g(mp, {"mount", "--read-only", img, mp});
  REQUIRE_MOUNTED(g);
  Fd fd(mp, O_RDONLY);
  std::vector<uint8_t> r(kChunk), zeros(kChunk, 0);
  for (uint64_t off = 0; off < 64 * MiB; off += kChunk) {
    if (off >= failed_at && off < failed_at + kChunk) continue;  // the failed write: either
    REQUIRE(PreadAll(fd.get(), r.data(), kChunk, off));
    const std::vector<uint8_t>& want = off < 8 * MiB || (off >= 16 * MiB && off < acked_end) ? Block(off, kChunk, 1)
                                       : off < 12 * MiB                                       ? Block(off, kChunk, 2)
                                                                                              : zeros;
    REQUIRE_MESSAGE(r == want, "wrong data at " << off);
  }
  fd.Close();
  CHECK_UNMOUNTS(g);
}

// Writes from page writeback fail like direct ones: a shared mapping's msync reports the
// ENOSPC (the application learns its data is not stored), the daemon goes on, and once there
// is space again the rewritten pages land.
TEST_CASE("mount enospc: mapped writes on a full host fail msync with ENOSPC; once there is space they land") {
  RequireMountTools();
  Scratch s;
  SmallHost host(s, "16m");
  std::string img = host.File("img.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  const uint64_t size = 32 * MiB;
  QemuImgCreate(img, std::to_string(size));
  QemuIo(img, {"write -P 0x11 0 2M"});
  MakeRaw(ref, size);
  {
    Fd r(ref, O_RDWR);
    std::vector<char> b(2 * MiB, 0x11);
    std::memset(b.data() + 4096, 0x22, 64 * KiB);
    REQUIRE(PwriteAll(r.get(), b.data(), b.size(), 0));
  }
  const std::vector<uint8_t> blk = Block(8 * MiB, 4 * MiB, 3);
  {
    Fd r(ref, O_RDWR);
    REQUIRE(PwriteAll(r.get(), blk.data(), blk.size(), 8 * MiB));
  }
  FillUp(host.File("filler"), 256 * KiB);
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd fd(mp, O_RDWR);
    REQUIRE(fd.valid());
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    REQUIRE_MESSAGE(p != MAP_FAILED, strerror(errno));
    char* m = static_cast<char*>(p);
    // In place over allocated clusters: needs no space.
    std::memset(m + 4096, 0x22, 64 * KiB);
    CHECK(::msync(m, 2 * MiB, MS_SYNC) == 0);
    // 4 MiB into unallocated clusters: more than the host has.
    std::memcpy(m + 8 * MiB, blk.data(), blk.size());
    int rc = ::msync(m + 8 * MiB, 4 * MiB, MS_SYNC);
    int err = errno;
    CHECK(rc == -1);
    CHECK_MESSAGE(err == ENOSPC, strerror(err));
    // The daemon goes on: reads work and what msync acknowledged is there.
    {
      std::vector<char> got(2 * MiB), want(2 * MiB, 0x11);
      std::memset(want.data() + 4096, 0x22, 64 * KiB);
      REQUIRE(PreadAll(fd.get(), got.data(), got.size(), 0));
      CHECK(got == want);
    }
    // Space again. The failed pages are clean now (their data is not in the image): write
    // them again, then msync and fsync succeed.
    REQUIRE(::unlink(host.File("filler").c_str()) == 0);
    std::memcpy(m + 8 * MiB, blk.data(), blk.size());
    CHECK(::msync(m + 8 * MiB, 4 * MiB, MS_SYNC) == 0);
    CHECK(::fsync(fd.get()) == 0);
    ::munmap(p, size);
  }
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount enospc: a dirty lazy-refcounts image on a full host is refused with one line, unchanged, and repaired once there is space") {
  RequireMountTools();
  Scratch s;
  SmallHost host(s, "16m");
  std::string img = host.File("lazy.qcow2"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M", "lazy_refcounts=on");
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDWR);
    for (uint64_t off = 0; off < 4 * MiB; off += MiB) REQUIRE(PwriteAll(fd.get(), Block(off, MiB, 3).data(), MiB, off));
    REQUIRE(::fsync(fd.get()) == 0);
    fd.Close();
    g.SignalAndWait(SIGKILL);  // no clean close: the dirty bit stays
  }
  REQUIRE((IncompatibleFeatures(img) & 1) == 1);
  // Room for one cluster: the rebuild (a refcount block and a refcount table) writes its
  // first cluster and fails on the second.
  FillUp(host.File("filler"), 64 * KiB);
  std::string sum = Sha256File(img);
  {
    std::vector<std::string> argv = {Bin(), "mount", img, mp};
    CmdResult r = RunTimed(argv, WithTimeout(30000));
    INFO(Describe(argv, r));
    CHECK(r.exit_code == 1);
    // One error line (a warning that the repair starts may come before it).
    std::string errors;
    std::istringstream lines(r.err);
    for (std::string l; std::getline(lines, l);)
      if (!Contains(l, "qcowfs: warn:")) errors += l + "\n";
    CHECK(CountLines(errors) == 1);
    CHECK(Contains(r.err, img));
    CHECK(Contains(r.err, "space"));
    CHECK_FALSE(IsMounted(mp));
  }
  CHECK(Sha256File(img) == sum);
  REQUIRE(::unlink(host.File("filler").c_str()) == 0);
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDONLY);
    std::vector<uint8_t> r(MiB);
    for (uint64_t off = 0; off < 4 * MiB; off += MiB) {
      REQUIRE(PreadAll(fd.get(), r.data(), MiB, off));
      CHECK(r == Block(off, MiB, 3));
    }
    fd.Close();
    CHECK_UNMOUNTS(g);
  }
  CheckClean(img);
}
