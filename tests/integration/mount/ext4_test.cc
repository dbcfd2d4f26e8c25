// A real filesystem on the mounted file: mkfs.ext4, e2fsck and debugfs (no loop device
// needed), across an unmount and a remount, with qemu-img as the final oracle.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <random>
#include <string>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

void Fsck(const std::string& target) {
  std::vector<std::string> argv = {"e2fsck", "-fn", target};
  CmdResult r = RunTimed(argv, WithTimeout(120000));
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 0);
}

std::string DebugfsCat(const std::string& target, const std::string& file) {
  CmdResult r = Must({"debugfs", "-R", "cat " + file, target}, WithTimeout(60000));
  return r.out;
}

}  // namespace

TEST_CASE("mount ext4: mkfs, e2fsck, debugfs write; the files survive a remount") {
  RequireMountTools();
  for (const char* t : {"mkfs.ext4", "e2fsck", "debugfs"}) RequireTool(t);
  Scratch s;
  std::string img = s.File("fs.qcow2"), mp = s.FileMountpoint();
  QemuImgCreate(img, "256M");
  // Content that spans many blocks and is easy to tell apart.
  std::string hello = "hello from qcowfs\n", big;
  std::mt19937_64 rng(42);
  while (big.size() < 700 * KiB) big += "line " + std::to_string(rng() % 1000000007) + " of the big file\n";
  std::string hello_src = s.File("hello.txt"), big_src = s.File("big.txt"), cmds = s.File("cmds");
  WriteFileText(hello_src, hello);
  WriteFileText(big_src, big);
  WriteFileText(cmds, "mkdir /d\nwrite " + hello_src + " /hello\nwrite " + big_src + " /d/big\n");
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    Must({"mkfs.ext4", "-q", "-F", mp}, WithTimeout(120000));
    Fsck(mp);
    Must({"debugfs", "-w", "-f", cmds, mp}, WithTimeout(60000));
    Fsck(mp);
    CHECK(DebugfsCat(mp, "/hello") == hello);
    CHECK_UNMOUNTS(g);
  }
  CheckClean(img);
  {
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    CHECK(DebugfsCat(mp, "/hello") == hello);
    CHECK(DebugfsCat(mp, "/d/big") == big);
    Fsck(mp);
    // Change it once more, then unmount by signal.
    WriteFileText(cmds, "rm /hello\nwrite " + big_src + " /big2\n");
    Must({"debugfs", "-w", "-f", cmds, mp}, WithTimeout(60000));
    std::string why = g.SignalAndWait(SIGTERM);
    INFO(why);
    CHECK(why.empty());
  }
  CheckClean(img);
  // Independently of qcowfs: qemu-img's view of the image holds the same filesystem.
  std::string raw = s.File("fs.raw");
  Must({"qemu-img", "convert", "-O", "raw", img, raw}, WithTimeout(120000));
  Fsck(raw);
  CHECK(DebugfsCat(raw, "/big2") == big);
  CHECK(DebugfsCat(raw, "/d/big") == big);
  CHECK(DebugfsCat(raw, "/hello").empty());
}
