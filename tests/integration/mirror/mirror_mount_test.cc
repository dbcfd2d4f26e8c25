// The mirror job through the real mount and the real CLI (SPEC §6): background and
// write-blocking jobs to new qcow2 and raw files, an existing file, qemu-nbd and nbdkit
// while fio --verify keeps writing, complete with and without pivot, and refused jobs.
// qemu-img compare / check / map are the oracle.
#include <doctest/doctest.h>
#include <linux/falloc.h>

#include <atomic>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "integration/mirror/mirror_rig.h"
#include "integration/mount/mount_guard.h"
#include "support/fio.h"
#include "support/nbd_servers.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

enum class TargetKind { kNewQcow2, kNewRaw, kExistingRaw, kQemuNbdUnix, kNbdkitTcp };

// One job under fio on the source rig.img (64M; data at 40M, zeros at 50M and 60M, a hole
// from 48M on). fio writes verified data to [0, 24M) and punches holes in [24M, 32M) from
// before `mirror start --wait` until after the job is ready; then complete --no-pivot and
// unmount. The target is then an exact copy (qemu-img compare), both images check clean,
// and the hole [48M, 64M) holds no data in the target. NBD targets serve a raw file with
// old content (never assumed zero), qemu-nbd on a Unix socket, nbdkit on 127.0.0.1.
void MirrorUnderFio(MirrorRig& r, TargetKind kind, const std::string& mode) {
  const bool qcow2 = kind == TargetKind::kNewQcow2;
  const std::string fmt = qcow2 ? "qcow2" : "raw", id = "f" + std::to_string(r.n);
  const std::string dst = r.s.File(id + "." + fmt);
  INFO("target kind " << static_cast<int>(kind) << ", mode " << mode << ", " << dst);
  if (kind == TargetKind::kExistingRaw || kind == TargetKind::kQemuNbdUnix || kind == TargetKind::kNbdkitTcp) {
    Must({"qemu-img", "create", "-q", "-f", "raw", dst, "64M"});
    QemuIo(dst, {"write -P 0xee 0 64M"}, "raw");
  }
  std::unique_ptr<Server> server;
  nlohmann::json target = {{"path", dst}, {"format", fmt}};
  if (kind == TargetKind::kExistingRaw) target["existing"] = true;
  if (kind == TargetKind::kQemuNbdUnix) {
    server = StartQemuNbd(r.s.dir, dst, {"--discard=unmap"});
    target = {{"nbd", UnixUri(r.s.dir.File("qemu-nbd.sock"))}};
  } else if (kind == TargetKind::kNbdkitTcp) {
    int port = FreePort();
    server = StartNbdkitTcp(r.s.dir, port, {"file", dst});
    target = {{"nbd", TcpUri(port)}};
  }
  {
    auto g = r.Mount();
    FioRun fio(r.s.dir, {r.mp, 0, 24 * MiB, 24 * MiB, 8 * MiB, 2000});
    CmdResult st = r.Mirror({"start", r.Job(id, mode, target), "--wait"});
    fio.Finish();
    INFO(Describe({"mirror", "start"}, st));
    REQUIRE(st.exit_code == 0);
    r.MustMirror({"complete", id, "--no-pivot"});
    CHECK(Contains(r.JobState(id), "completed"));
    CHECK_UNMOUNTS(*g);
  }
  server.reset();
  CheckClean(r.img);
  if (qcow2) CheckClean(dst);
  CheckSameContent(r.img, dst, fmt);
  CheckNoDataIn(dst, fmt, 48 * MiB, 16 * MiB);
  if (!qcow2) CHECK(AllocatedBytesOf(dst) <= 40 * MiB);  // du: fio's 32M and the 4M at 40M
}

void MirrorUnderFioBothModes(TargetKind kind) {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "64M");
  QemuIo(r.img, {"write -P 0x22 40M 4M", "write -z 50M 1M", "write -P 0x33 60M 64k", "write -z 60M 64k"});
  MirrorUnderFio(r, kind, "background");
  MirrorUnderFio(r, kind, "write-blocking");
}

}  // namespace

TEST_CASE("mirror mount fio: background and write-blocking to a new qcow2; --no-pivot leaves an exact copy") {
  MirrorUnderFioBothModes(TargetKind::kNewQcow2);
}
TEST_CASE("mirror mount fio: background and write-blocking to a new raw file") {
  MirrorUnderFioBothModes(TargetKind::kNewRaw);
}
TEST_CASE("mirror mount fio: background and write-blocking to an existing raw file") {
  MirrorUnderFioBothModes(TargetKind::kExistingRaw);
}
TEST_CASE("mirror mount fio: background and write-blocking to qemu-nbd on a Unix socket") {
  MirrorUnderFioBothModes(TargetKind::kQemuNbdUnix);
}
TEST_CASE("mirror mount fio: background and write-blocking to nbdkit on 127.0.0.1") {
  MirrorUnderFioBothModes(TargetKind::kNbdkitTcp);
}

TEST_CASE("mirror mount: write-blocking puts every acknowledged write on the target when it returns") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "16M");
  QemuIo(r.img, {"write -P 0x5a 0 16M"});
  std::string dst = r.s.File("dst.raw");
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "wb", "mode": "write-blocking", "target": {"path": ")" + dst +
                                   R"(", "format": "raw"}})"),
                "--wait"});
  Fd fd(r.mp, O_RDWR);
  auto same = [&](uint64_t off, uint64_t len) {
    auto a = ReadRange(r.mp, off, len), b = ReadRange(dst, off, len);
    return a == b;
  };
  std::mt19937_64 rng(3);
  struct Op {
    uint64_t off, len;
    int kind;  // 0 write, 1 zero range, 2 punch
  } ops[] = {{1, 1, 0}, {65535, 2, 0}, {65536 * 3 - 100, 300, 0}, {12345, 200000, 0}, {1 << 20, 4096, 1},
             {(1 << 20) + 77, 70000, 1}, {3 << 20, 64 << 10, 2}, {(5 << 20) + 1, 1000, 2}, {16 * MiB - 1, 1, 0}};
  for (const Op& op : ops) {
    if (op.kind == 0) {
      auto b = RandomBytes(rng, op.len);
      REQUIRE(PwriteAll(fd.get(), b.data(), op.len, op.off));
    } else {
      int mode = op.kind == 1 ? FALLOC_FL_ZERO_RANGE : (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
      REQUIRE(::fallocate(fd.get(), mode, static_cast<off_t>(op.off), static_cast<off_t>(op.len)) == 0);
    }
    CHECK_MESSAGE(same(op.off, op.len), "op at " << op.off << "+" << op.len << " kind " << op.kind);
  }
  CHECK(Contains(r.MustMirror({"status", "wb", "--json"}).out, "\"actively_synced\": true"));
  r.MustMirror({"cancel", "wb"});
  fd.Close();
  CHECK_UNMOUNTS(g);
  CheckClean(r.img);
}

TEST_CASE("mirror mount: pivot unlocks the source at once and later writes land only in the target") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "32M");
  QemuIo(r.img, {"write -P 0x11 0 4M"});
  std::string dst = r.s.File("dst.qcow2");
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "p", "target": {"path": ")" + dst + R"("}})"), "--wait"});
  // While the job runs the target is locked like any image in use.
  CHECK(RunTimed({"qemu-img", "info", dst}).exit_code != 0);
  r.MustMirror({"complete", "p"});
  CHECK(RunTimed({"qemu-img", "info", r.img}).exit_code == 0);  // no -U: unlocked
  CheckClean(r.img);
  std::string before = Sha256File(r.img);
  {
    Fd fd(r.mp, O_RDWR);
    std::vector<char> b(65536, 0x77);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 8 * MiB));
    REQUIRE(::fsync(fd.get()) == 0);
  }
  CHECK(Sha256File(r.img) == before);
  CHECK(Contains(g.Status(false).out, dst));
  CHECK_UNMOUNTS(g);
  CheckClean(dst);
  QemuIo(dst, {"read -P 0x11 0 4M", "read -P 0x77 8M 64k"});
  QemuIo(r.img, {"read -P 0 8M 64k"});
}

TEST_CASE("mirror mount: an existing target is never assumed to read zeros") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x11 1M 1M"});
  std::string dst = r.s.File("old.raw");
  Must({"qemu-img", "create", "-q", "-f", "raw", dst, "8M"});
  QemuIo(dst, {"write -P 0xff 0 8M"}, "raw");
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "e", "target": {"path": ")" + dst + R"(", "format": "raw", "existing": true}})"),
                "--wait"});
  r.MustMirror({"complete", "e", "--no-pivot"});
  CHECK_UNMOUNTS(g);
  CheckSameContent(r.img, dst);
}

TEST_CASE("mirror mount: refused jobs name the key or target, write nothing, and the daemon goes on") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  std::string exists = r.s.File("exists.raw"), small = r.s.File("small.raw");
  Must({"qemu-img", "create", "-q", "-f", "raw", exists, "8M"});
  Must({"qemu-img", "create", "-q", "-f", "raw", small, "4M"});
  std::string sum_exists = Sha256File(exists), sum_small = Sha256File(small);
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  std::string fresh = r.s.File("fresh.qcow2");
  struct Bad {
    std::string json, expect;
  } bad[] = {
      {R"({"target": {"path": ")" + fresh + R"("}, "granularity": "3K"})", "granularity"},
      {R"({"target": {"path": ")" + fresh + R"("}, "colour": 1})", "colour: unknown key"},
      {R"({"target": {"path": ")" + small + R"(", "format": "raw", "existing": true}})", "target.path " + small},
      {R"({"target": {"path": ")" + exists + R"(", "format": "raw"}})", "already exists"},
      {R"({"target": {"path": ")" + r.img + R"(", "existing": true}})", "is the source image"},
      {R"({"target": {"path": ")" + fresh + R"("}, "image": "nope.raw"})", "image"},
      {R"({"target": {"path": ")" + fresh + R"("}, "sync": "full", "mode": "passive"})", "mode"},
      {R"({"target": {"path": "/nonexistent-dir/x.qcow2"}})", "target.path /nonexistent-dir/x.qcow2"},
      {"{not json", "invalid JSON"},
  };
  for (const auto& b : bad) r.ExpectRefused(b.json, b.expect);
  CHECK(::access(fresh.c_str(), F_OK) != 0);
  CHECK(Sha256File(exists) == sum_exists);
  CHECK(Sha256File(small) == sum_small);
  CHECK(Contains(r.MustMirror({"status"}).out, "no mirror jobs"));
  CHECK(r.Mirror({"complete", "nosuch"}).exit_code == 1);
  CHECK(r.Mirror({"bogus"}).exit_code == 2);
  // A second job on one image is refused while the first runs; growing the image fails.
  std::string slow = r.s.File("slow.qcow2");
  r.MustMirror({"start", r.Job(R"({"id": "a", "speed": 1, "target": {"path": ")" + slow + R"("}})")});
  CmdResult second = r.Mirror({"start", r.Job(R"({"id": "b", "target": {"path": ")" + fresh + R"("}})")});
  CHECK(second.exit_code == 1);
  CHECK(Contains(second.err, "already mirroring"));
  CHECK(::truncate(r.mp.c_str(), 16 * MiB) != 0);
  CHECK(errno == EBUSY);
  r.MustMirror({"cancel", "a"});
  CHECK(r.Mirror({"cancel", "a"}).exit_code == 0);  // already ended: nothing changes
  CHECK(Contains(r.MustMirror({"status", "a"}).out, "cancelled"));
  CHECK(g.Status(false).exit_code == 0);
  CHECK_UNMOUNTS(g);
  CheckClean(r.img);
  CheckClean(slow);  // a cancelled qcow2 target is consistent
}

TEST_CASE("mirror mount: a job in the config starts at mount; unmount cancels a running job") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x33 0 8M"});
  std::string dst = r.s.File("cfg.qcow2"), cfg = r.s.File("mount.json");
  WriteFileText(cfg, R"({"mountpoint": ")" + r.mp + R"(", "socket": ")" + r.sock + R"(", "images": [{"path": ")" +
                         r.img + R"("}], "mirrors": [{"id": "c", "speed": 65536, "target": {"path": ")" + dst + R"("}}]})");
  MountGuard g(r.mp, {"mount", "--config", cfg}, r.sock);
  REQUIRE_MOUNTED(g);
  CHECK(Contains(r.MustMirror({"status", "c", "--json"}).out, "\"state\": \"running\""));
  CHECK_UNMOUNTS(g);
  CheckClean(r.img);
  CheckClean(dst);
}
