// The mirror job to real NBD servers through the mount (SPEC §6): qemu-nbd on a Unix
// socket (a guest punch under write-blocking reaches it as zeros although it ignores
// TRIM; --no-pivot leaves an exact copy; pivot onto it), nbdkit on 127.0.0.1 (nbd:// URI),
// and faults while fio --verify writes: a paused server under write-blocking, injected EIO,
// a full target, a server killed mid-job, a closed port. In each fault the job fails with
// the cause, the guest (fio) sees no error and the source stays clean. Convergence of
// write-blocking against a rate-limited target, and cancel with a request hung at the target.
#include <doctest/doctest.h>
#include <linux/falloc.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "integration/mirror/mirror_rig.h"
#include "integration/mount/mount_guard.h"
#include "support/fio.h"
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
  r.Source("8M", {"write -P 0x41 0 1M"});
  std::string ctl = r.s.File("pause.ctl");
  auto server = r.Nbdkit({"--filter=pause", "memory", "8M", "pause-control=" + ctl});
  auto g = r.Mount();
  r.MustMirror({"start", r.Job("z", "write-blocking", r.NbdkitTarget(), {{"target_timeout", 2}}), "--wait"});
  FioRun fio(r.s.dir, {r.mp, 4 * MiB, 4 * MiB, 0, 0, 4000});  // over the pause and the timeout
  PauseControl(ctl, 'p');
  {
    Fd fd(r.mp, O_RDWR);
    std::vector<char> b(4096, 0x42);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 2 * MiB));  // returns (after the timeout)
    REQUIRE(::fsync(fd.get()) == 0);
  }
  fio.Finish();
  CHECK(Contains(r.JobState("z"), "failed"));
  INFO(r.JobState("z"));
  CHECK(Contains(r.JobState("z"), "no reply within 2000 ms"));
  CHECK(r.Mirror({"cancel", "z"}, 5000).exit_code == 0);
  CHECK_UNMOUNTS(*g);
  PauseControl(ctl, 'r');
  CheckClean(r.img);
  QemuIo(r.img, {"read -P 0x41 0 1M", "read -P 0x42 2M 4k"});
}

TEST_CASE("mirror nbd: injected EIO, a full target, a killed server fail the job with the cause; fio sees no error") {
  RequireMountTools();
  RequireTool("nbdkit");
  struct Case {
    const char* name;
    std::vector<std::string> args;
    const char* cause;
    bool kill;  // killed (SIGKILL) mid-job under write-blocking, else refused by `start --wait`
  } cases[] = {{"error filter", {"--filter=error", "memory", "8M", "error=EIO", "error-pwrite-rate=100%"}, "Input/output error", false},
               {"full plugin", {"full", "8M"}, "No space left", false},
               {"killed server", {"memory", "8M"}, "not connected", true}};
  for (const auto& c : cases) {
    INFO(c.name);
    MirrorRig r;
    r.Source("8M", {"write -P 0x51 0 4M"});
    auto server = r.Nbdkit(c.args);
    auto g = r.Mount();
    FioRun fio(r.s.dir, {r.mp, 4 * MiB, 2 * MiB, 0, 0, 2500});
    if (c.kill) {
      // 1 MiB/s: the job is mid-copy when the server dies; fio's writes to copied chunks go
      // through to the server until then.
      r.MustMirror({"start", r.Job("e", "write-blocking", r.NbdkitTarget(), {{"speed", 1 * MiB}})});
      CHECK(WaitFor([&] { return r.StatusJson("e")["bytes_done"].get<uint64_t>() > 0; }, 30000));
      server->Kill(SIGKILL);
      CHECK(WaitFor([&] { return Contains(r.JobState("e"), "failed"); }, 30000));
    } else {
      CmdResult st = r.Mirror({"start", r.Job("e", "background", r.NbdkitTarget()), "--wait"});
      INFO(Describe({"mirror", "start"}, st));
      CHECK(st.exit_code == 1);
      CHECK(Contains(st.err, c.cause));
    }
    {
      Fd fd(r.mp, O_RDWR);
      std::vector<char> b(4096, 0x52);
      CHECK(PwriteAll(fd.get(), b.data(), b.size(), 6 * MiB + 512));
      CHECK(::fsync(fd.get()) == 0);
    }
    fio.Finish();
    std::string state = r.JobState("e");
    INFO(state);
    CHECK(Contains(state, "failed"));
    CHECK((Contains(state, c.cause) || (c.kill && Contains(state, "connection lost"))));
    CHECK(r.Mirror({"cancel", "e"}, 5000).exit_code == 0);
    CHECK_UNMOUNTS(*g);
    CheckClean(r.img);
    QemuIo(r.img, {"read -P 0x51 0 4M", "read -P 0x52 6291968 4096"});
  }
}

// A write-blocking job against a target slower than the guest (nbdkit's rate filter): the
// guest's writes into copied chunks go through at the target's pace and add nothing dirty,
// so the job becomes ready while the writer keeps writing. In background mode the same
// writer re-dirties chunks faster than they are copied: the job stays running until the
// writer stops (which shows the writer is indeed faster than the copy).
TEST_CASE("mirror nbd: write-blocking converges under a writer faster than a rate-limited target") {
  RequireMountTools();
  RequireTool("nbdkit");
  for (std::string mode : {"write-blocking", "background"}) {
    INFO(mode);
    MirrorRig r;
    r.Source("16M", {"write -P 0x61 0 2M"});
    std::string rate = r.s.File("rate");
    // 16 Mbit/s: 2 MiB/s for the copy and the guest's writes together (until the writer stops).
    WriteFileText(rate, "16M\n");
    auto server = r.Nbdkit({"--filter=rate", "memory", "16M", "rate=16M", "rate-file=" + rate});
    auto g = r.Mount();
    {
      GuestWriter w(r.mp, 8 * MiB, 2);
      REQUIRE(w.WaitWrites(20, 30000));
      std::string job = r.Job("c", mode, r.NbdkitTarget());
      if (mode == "write-blocking") {
        CmdResult st = r.Mirror({"start", job, "--wait"}, 60000);
        INFO(Describe({"mirror", "start"}, st));
        CHECK(st.exit_code == 0);
        CHECK(Contains(r.JobState("c"), "ready"));
        CHECK(w.WaitWrites(20, 30000));  // the writer still writes, the job stays ready
        CHECK(Contains(r.JobState("c"), "ready"));
        CHECK(r.StatusJson("c")["actively_synced"].get<bool>());
      } else {
        r.MustMirror({"start", job});
        // Sampled over at least 100 writes and 3 s: never ready while the writer runs.
        bool ready = false;
        auto now = std::chrono::steady_clock::now;
        auto until = now() + std::chrono::seconds(3), cap = now() + std::chrono::seconds(60);
        int from = w.writes();
        while ((now() < until || w.writes() < from + 100) && now() < cap) {
          if (Contains(r.JobState("c"), "ready")) ready = true;
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        CHECK_FALSE(ready);
        CHECK(Contains(r.JobState("c"), "running"));
      }
      CHECK(w.Stop());
    }
    WriteFileText(rate, "10G\n");  // the rest (and the compare) at full speed
    CHECK(WaitFor([&] { return Contains(r.JobState("c"), "ready"); }, 120000));
    r.MustMirror({"complete", "c", "--no-pivot"});
    CHECK_UNMOUNTS(*g);
    CheckClean(r.img);
    CheckSameContent(r.img, UnixUri(r.nsock));
  }
}

// SPEC §6: cancel returns within 3 s even with a request hung at the target, and no request
// reaches the target after it returns; the guest keeps reading and writing meanwhile and
// unmount stays prompt. The target (nbdkit: the log filter outside the pause filter, so
// the log shows every request that arrived) is paused with a copy (background) or a guest
// write-through (write-blocking) in flight; target_timeout 60 s, so a cancel that waited
// for the request would take a minute.
//
// The hung guest write is dd's, in its own process: while a write to a FUSE file is in
// flight the kernel holds the inode lock, and closing any descriptor of that file (FUSE
// FLUSH) waits for it; a test process holding one would hang every child it forks (the
// CLI) at exec, which closes it.
TEST_CASE("mirror nbd: cancel returns within 3 s with a request hung at the target; nothing reaches it after") {
  RequireMountTools();
  RequireTool("nbdkit");
  for (std::string mode : {"background", "write-blocking"}) {
    INFO(mode);
    MirrorRig r;
    r.Source("16M", {"write -P 0x71 0 8M"});
    std::string ctl = r.s.File("pause.ctl"), log = r.s.File("requests.log");
    auto server = r.Nbdkit({"--filter=log", "--filter=pause", "memory", "16M", "logfile=" + log, "pause-control=" + ctl});
    auto g = r.Mount();
    std::string job = r.Job("h", mode, r.NbdkitTarget(), {{"target_timeout", 60}});
    std::unique_ptr<Server> guest;  // the hung guest write (write-blocking)
    if (mode == "background") {
      PauseControl(ctl, 'p');
      int before = NbdkitRequestsLogged(log);
      r.MustMirror({"start", job});
      REQUIRE(WaitFor([&] { return NbdkitRequestsLogged(log) > before; }, 30000));  // a copy is hung
      // The guest goes on: a write and a read through the mount return at once.
      Fd fd(r.mp, O_RDWR);
      std::vector<char> b(8192, 0x72);
      CHECK(MillisOf([&] { CHECK(PwriteAll(fd.get(), b.data(), b.size(), 9 * MiB)); }) < 2000);
      CHECK(MillisOf([&] { CHECK(ReadRange(r.mp, 0, 1 * MiB) == std::vector<char>(1 * MiB, 0x71)); }) < 2000);
    } else {
      r.MustMirror({"start", job, "--wait"});
      PauseControl(ctl, 'p');
      int before = NbdkitRequestsLogged(log);
      std::string pattern = r.s.File("pattern");
      WriteFileText(pattern, std::string(4096, '\x73'));
      guest = std::make_unique<Server>(std::vector<std::string>{"dd", "if=" + pattern, "of=" + r.mp, "bs=4096",
                                                                 "seek=768", "count=1", "conv=notrunc"},
                                       r.s.File("dd.log"), [] { return true; });
      REQUIRE(WaitFor([&] { return NbdkitRequestsLogged(log) > before; }, 30000));  // written through: hung
      CHECK(guest->WaitExit(0) == -1);
    }
    CHECK(Contains(r.JobState("h"), mode == "background" ? "running" : "ready"));
    CmdResult cancel{127, "", ""};
    long long ms = MillisOf([&] { cancel = r.Mirror({"cancel", "h"}, 30000); });
    int after_cancel = NbdkitRequestsLogged(log);
    INFO(Describe({"mirror", "cancel"}, cancel));
    CHECK(cancel.exit_code == 0);
    CHECK(ms < 3000);
    // The hung guest write returns now (with the source's result).
    if (guest) CHECK(guest->WaitExit(3000) == 0);
    CHECK(Contains(r.JobState("h"), "cancelled"));
    {
      // The guest goes on, the target hears nothing more, even once it answers again.
      Fd fd(r.mp, O_RDWR);
      std::vector<char> b(65536, 0x74);
      CHECK(PwriteAll(fd.get(), b.data(), b.size(), 12 * MiB));
      CHECK(ReadRange(r.mp, 12 * MiB, 65536) == b);
      PauseControl(ctl, 'r');
      CHECK(PwriteAll(fd.get(), b.data(), b.size(), 13 * MiB));
      REQUIRE(::fsync(fd.get()) == 0);
    }
    CHECK(MillisOf([&] { CHECK_UNMOUNTS(*g); }) < 5000);
    INFO(ReadWholeFile(log));
    CHECK(NbdkitRequestsLogged(log) == after_cancel);
    CheckClean(r.img);
    QemuIo(r.img, {"read -P 0x71 0 3M", "read -P 0x74 12M 64k", "read -P 0x74 13M 64k"});
    if (mode == "write-blocking") QemuIo(r.img, {"read -P 0x73 3M 4k"});
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
