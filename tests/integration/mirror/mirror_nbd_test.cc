// The mirror job to real NBD servers through the mount (SPEC §6): qemu-nbd on a Unix
// socket (a guest punch under write-blocking reaches it as zeros although it ignores
// TRIM; --no-pivot leaves an exact copy; pivot onto it), nbdkit on 127.0.0.1 (nbd:// URI),
// and faults: a paused server under write-blocking, injected EIO, a full target, a closed
// port. In each fault the job fails with the cause, the guest sees no error and the
// source stays clean.
#include <doctest/doctest.h>
#include <linux/falloc.h>

#include <string>
#include <vector>

#include "integration/mirror/mirror_rig.h"
#include "integration/mount/mount_guard.h"
#include "support/nbd_servers.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;


TEST_CASE("mirror nbd: qemu-nbd target: a punch reaches it as zeros; --no-pivot leaves an exact copy") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "16M");
  QemuIo(r.img, {"write -P 0x11 0 8M"});
  std::string dst = r.s.File("nbd.raw");
  Must({"qemu-img", "create", "-q", "-f", "raw", dst, "16M"});
  QemuIo(dst, {"write -P 0xee 0 16M"}, "raw");  // old content: never assumed zero
  auto server = StartQemuNbd(r.s.dir, dst);     // default --discard=ignore
  std::string uri = UnixUri(r.s.dir.File("qemu-nbd.sock"));
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "n", "mode": "write-blocking", "target": {"nbd": ")" + uri + R"("}})"), "--wait"});
  {
    Fd fd(r.mp, O_RDWR);
    REQUIRE(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1 * MiB, 256 * KiB) == 0);
    CHECK(AllBytes(ReadRange(dst, 1 * MiB, 256 * KiB), 0));  // on the target when it returned
    std::vector<char> b(3000, 0x44);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 5 * MiB + 7));
    CHECK(ReadRange(dst, 5 * MiB + 7, 3000) == b);
  }
  r.MustMirror({"complete", "n", "--no-pivot"});
  CHECK_UNMOUNTS(g);
  server.reset();
  CheckClean(r.img);
  CheckSameContent(r.img, dst);
}

TEST_CASE("mirror nbd: pivot onto qemu-nbd: the source is unlocked, later writes land in the export") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x21 0 2M"});
  std::string dst = r.s.File("nbd.raw");
  Must({"qemu-img", "create", "-q", "-f", "raw", dst, "8M"});
  auto server = StartQemuNbd(r.s.dir, dst);
  std::string uri = UnixUri(r.s.dir.File("qemu-nbd.sock"));
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "p", "target": {"nbd": ")" + uri + R"("}})"), "--wait"});
  r.MustMirror({"complete", "p"});
  CHECK(RunTimed({"qemu-img", "info", r.img}).exit_code == 0);
  std::string before = Sha256File(r.img);
  {
    Fd fd(r.mp, O_RDWR);
    std::vector<char> b(8192, 0x5c);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 4 * MiB));
    REQUIRE(::fsync(fd.get()) == 0);
    CHECK(ReadRange(dst, 4 * MiB, 8192) == b);
    CHECK(AllBytes(ReadRange(r.mp, 0, 2 * MiB), 0x21));
  }
  CHECK(Sha256File(r.img) == before);
  CHECK_UNMOUNTS(g);
  server.reset();
  CheckClean(r.img);
  QemuIo(dst, {"read -P 0x21 0 2M", "read -P 0x5c 4M 8k"}, "raw");
}

TEST_CASE("mirror nbd: nbdkit on 127.0.0.1 with an nbd:// URI, then pivot") {
  RequireMountTools();
  RequireTool("nbdkit");
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x31 1M 3M"});
  int port = FreePort();
  Server server({"nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", std::to_string(port), "memory", "8M"},
                r.s.File("nbdkit.log"), [port] { return TcpConnects(port); });
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  std::string uri = "nbd://127.0.0.1:" + std::to_string(port) + "/";
  r.MustMirror({"start", r.Job(R"({"id": "k", "copy_on_read": true, "target": {"nbd": ")" + uri + R"("}})"), "--wait"});
  r.MustMirror({"complete", "k"});
  CheckClean(r.img);
  // The mount now reads the export: what the source held.
  CHECK(AllBytes(ReadRange(r.mp, 0, 1 * MiB), 0));
  CHECK(AllBytes(ReadRange(r.mp, 1 * MiB, 3 * MiB), 0x31));
  CHECK(AllBytes(ReadRange(r.mp, 4 * MiB, 4 * MiB), 0));
  CHECK_UNMOUNTS(g);
}

TEST_CASE("mirror nbd: a paused server under write-blocking fails the job, never the guest") {
  RequireMountTools();
  RequireTool("nbdkit");
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x41 0 1M"});
  std::string nsock = r.s.File("nbdkit.sock"), ctl = r.s.File("pause.ctl");
  auto server = StartNbdkitUnix(r.s.dir, nsock, {"--filter=pause", "memory", "8M", "pause-control=" + ctl});
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start",
                r.Job(R"({"id": "z", "mode": "write-blocking", "target_timeout": 2, "target": {"nbd": ")" + UnixUri(nsock) +
                      R"("}})"),
                "--wait"});
  PauseControl(ctl, 'p');
  {
    Fd fd(r.mp, O_RDWR);
    std::vector<char> b(4096, 0x42);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 2 * MiB));  // returns (after the timeout)
    REQUIRE(::fsync(fd.get()) == 0);
  }
  CHECK(Contains(r.JobState("z"), "failed"));
  INFO(r.JobState("z"));
  CHECK(Contains(r.JobState("z"), "no reply within 2000 ms"));
  CHECK(r.Mirror({"cancel", "z"}, 5000).exit_code == 0);
  CHECK_UNMOUNTS(g);
  PauseControl(ctl, 'r');
  CheckClean(r.img);
  QemuIo(r.img, {"read -P 0x41 0 1M", "read -P 0x42 2M 4k"});
}

TEST_CASE("mirror nbd: injected EIO and a full target fail the job with the cause; the guest sees no error") {
  RequireMountTools();
  RequireTool("nbdkit");
  struct Case {
    const char* name;
    std::vector<std::string> args;
    const char* cause;
  } cases[] = {{"error filter", {"--filter=error", "memory", "8M", "error=EIO", "error-pwrite-rate=100%"}, "Input/output error"},
               {"full plugin", {"full", "8M"}, "No space left"}};
  for (const auto& c : cases) {
    INFO(c.name);
    MirrorRig r;
    QemuImgCreate(r.img, "8M");
    QemuIo(r.img, {"write -P 0x51 0 4M"});
    std::string nsock = r.s.File("nbdkit.sock");
    auto server = StartNbdkitUnix(r.s.dir, nsock, c.args);
    MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
    REQUIRE_MOUNTED(g);
    CmdResult st = r.Mirror({"start", r.Job(R"({"id": "e", "target": {"nbd": ")" + UnixUri(nsock) + R"("}})"), "--wait"});
    INFO(Describe({"mirror", "start"}, st));
    CHECK(st.exit_code == 1);
    CHECK(Contains(st.err, c.cause));
    {
      Fd fd(r.mp, O_RDWR);
      std::vector<char> b(4096, 0x52);
      CHECK(PwriteAll(fd.get(), b.data(), b.size(), 6 * MiB));
      CHECK(::fsync(fd.get()) == 0);
    }
    CHECK(Contains(r.JobState("e"), "failed"));
    CHECK_UNMOUNTS(g);
    CheckClean(r.img);
  }
}

TEST_CASE("mirror nbd: a closed port or a wrong-size export is refused with one line naming target.nbd") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  std::string small = r.s.File("small.raw");
  Must({"qemu-img", "create", "-q", "-f", "raw", small, "4M"});
  auto server = StartQemuNbd(r.s.dir, small);
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  std::string closed = "nbd://127.0.0.1:" + std::to_string(FreePort()) + "/";
  for (const std::string& uri : {closed, UnixUri(r.s.dir.File("qemu-nbd.sock"))}) {
    CmdResult res = r.Mirror({"start", r.Job(R"({"target": {"nbd": ")" + uri + R"("}, "target_timeout": 3})")});
    INFO(Describe({"mirror", "start"}, res));
    CHECK(res.exit_code == 1);
    CHECK(CountLines(res.err) == 1);
    CHECK(Contains(res.err, "target.nbd " + uri));
  }
  CHECK(Contains(r.MustMirror({"status"}).out, "no mirror jobs"));
  CHECK_UNMOUNTS(g);
}
