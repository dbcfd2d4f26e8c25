// A host fdatasync that fails once, through the real mount (issue 9 items 4 and 10):
// Linux drops the pages whose writeback failed, so after one failed host sync every later
// fsync of the mounted file must fail too (the host's next sync would succeed and vouch
// for lost data) until the image is reopened; the unmount reports the failure; the image
// has no corruption and everything acknowledged before reads back. The fault comes from
// the LD_PRELOAD library (tests/support/sync_fault_preload.c), no product hook.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "integration/mount/mount_guard.h"
#include "integration/stress/sync_fault.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

long long SyncCount(const std::string& file) {
  std::string t = ReadFileText(file);
  return t.empty() ? 0 : std::stoll(t);
}

}  // namespace

TEST_CASE("sync error: after one failed host fdatasync every later fsync fails until a remount") {
  RequireMountTools();
  std::string lib = SyncFaultPreloadPath();
  Scratch s;
  std::string img = s.File("img.qcow2"), pristine = s.File("pristine.qcow2"), mp = s.FileMountpoint();
  std::string counts = s.File("counts");
  QemuImgCreate(pristine, "64M", "cluster_size=4k");
  std::vector<char> a(65536, 0x11), b(65536, 0x22);
  // Calibration: how many host syncs the mount and the first fsync make.
  long long after_first = 0;
  {
    Must({"cp", pristine, img});
    RunOpts o;
    AddSyncFaultPreload(&o.env, lib);
    o.env["QCOWFS_FAULT_SYNC_COUNT_FILE"] = counts;
    MountGuard g(mp, {"mount", img, mp}, "", o);
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDWR);
    REQUIRE(PwriteAll(fd.get(), a.data(), a.size(), 0));
    REQUIRE(::fsync(fd.get()) == 0);
    after_first = SyncCount(counts);
    fd.Close();
    CHECK_UNMOUNTS(g);
  }
  REQUIRE(after_first > 0);
  // The run: the first host sync of the second fsync fails, later host syncs work.
  Must({"cp", pristine, img});
  ::unlink(counts.c_str());
  RunOpts o;
  AddSyncFaultPreload(&o.env, lib);
  o.env["QCOWFS_FAULT_FAIL_SYNC_ONCE"] = std::to_string(after_first + 1);
  {
    MountGuard g(mp, {"mount", img, mp}, "", o);
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDWR);
    REQUIRE(PwriteAll(fd.get(), a.data(), a.size(), 0));
    REQUIRE(::fsync(fd.get()) == 0);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 8 * MiB));  // a new cluster and L2 table
    CHECK(::fsync(fd.get()) != 0);
    CHECK(errno == EIO);
    CHECK(::fsync(fd.get()) != 0);  // sticky: the host would say yes now
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 16 * MiB));  // writes go on
    CHECK(::fsync(fd.get()) != 0);
    CHECK(AllBytes(ReadRange(mp, 0, 65536), 0x11));  // reads go on
    fd.Close();
    std::string why = g.Unmount();
    INFO(why);
    CHECK(Contains(why, "exited with status 1"));  // the close could not vouch for the data
  }
  CmdResult c = RunTimed({"qemu-img", "check", img});
  INFO(c.out << c.err);
  CHECK((c.exit_code == 0 || c.exit_code == 3));
  QemuIo(img, {"read -P 0x11 0 64k"});
  // Reopened: flushes work again and the image ends clean.
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    Fd fd(mp, O_RDWR);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 24 * MiB));
    CHECK(::fsync(fd.get()) == 0);
    fd.Close();
    CHECK_UNMOUNTS(g);
  }
  c = RunTimed({"qemu-img", "check", img});
  CHECK((c.exit_code == 0 || c.exit_code == 3));
  QemuIo(img, {"read -P 0x11 0 64k", "read -P 0x22 24M 64k"});
}
