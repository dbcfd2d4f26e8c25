// Sync "top" through the real mount (SPEC §6): a new qcow2 target gets the source's
// backing file (or target.backing) and only what the top layer allocates is copied;
// zeros in the top that hide base data stay zeros; the base-only ranges stay in the base.
// qemu-img compare / check / map are the oracle.
#include <doctest/doctest.h>
#include <linux/falloc.h>

#include <string>
#include <vector>

#include "integration/mirror/mirror_rig.h"
#include "integration/mount/mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

// Bytes of [off, off+len) that img's own layer allocates (qemu-img map depth 0, data or
// zero flag), without its backing file.
uint64_t TopAllocated(const std::string& img, uint64_t off, uint64_t len) {
  CmdResult r = Must({"qemu-img", "map", "--output=json", img});
  uint64_t n = 0;
  for (const auto& e : nlohmann::json::parse(r.out)) {
    if (e.at("depth").get<int>() != 0 || !e.value("present", true)) continue;
    uint64_t s = std::max(e.at("start").get<uint64_t>(), off);
    uint64_t t = std::min(e.at("start").get<uint64_t>() + e.at("length").get<uint64_t>(), off + len);
    if (s < t) n += t - s;
  }
  return n;
}

std::string BackingOf(const std::string& img) { return QemuInfo(img).value("backing-filename", std::string()); }

// A 32 MiB base with data everywhere below 24M, and an overlay (relative backing name)
// that writes [4M, 5M), zeroes [8M, 9M) over base data, and leaves the rest to the base.
struct TopRig : MirrorRig {
  std::string base = s.File("base.qcow2");
  std::string dst_dir = s.DirMountpoint("elsewhere");
  TopRig() {
    QemuImgCreate(base, "32M");
    QemuIo(base, {"write -P 0xb0 0 24M"});
    Must({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", img, "32M"});
    QemuIo(img, {"write -P 0x41 4M 1M", "write -z 8M 1M"});
  }
};

}  // namespace

TEST_CASE("mirror top: only the top layer is copied, onto the same base; --no-pivot leaves an exact copy") {
  RequireMountTools();
  for (std::string mode : {"background", "write-blocking"}) {
    CAPTURE(mode);
    TopRig r;
    // In another directory, so the overlay's relative backing name would not resolve there.
    std::string dst = r.dst_dir + "/top.qcow2";
    MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
    REQUIRE_MOUNTED(g);
    r.MustMirror({"start", r.Job(R"({"id": "t", "sync": "top", "mode": ")" + mode + R"(", "target": {"path": ")" +
                                 dst + R"("}})"),
                  "--wait"});
    // Guest writes during the job: new data over base data, a punch over base data (must
    // read zeros on the target, not the base), and a write into the zeroed range.
    {
      Fd fd(r.mp, O_RDWR);
      std::vector<char> b(192 << 10, 0x5c);
      REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 12 * MiB + 4096));
      REQUIRE(::fallocate(fd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * MiB, 1 * MiB) == 0);
      REQUIRE(PwriteAll(fd.get(), b.data(), 4096, 8 * MiB + 65536));
      REQUIRE(::fsync(fd.get()) == 0);
    }
    r.MustMirror({"complete", "t", "--no-pivot"});
    CHECK_UNMOUNTS(g);
    CheckClean(r.img);
    CheckClean(dst);
    CHECK(BackingOf(dst) == r.base);  // the source's backing file, made absolute
    CheckSameContent(r.img, dst, "qcow2");
    QemuIo(dst, {"read -P 0xb0 0 4M", "read -P 0x41 4M 1M", "read -P 0 8M 64k", "read -P 0x5c 8256k 4k",
                 "read -P 0 16M 1M", "read -P 0xb0 20M 4M"});
    // The base-only ranges are not in the target's own layer; the top ranges are.
    CHECK(TopAllocated(dst, 0, 4 * MiB) == 0);
    CHECK(TopAllocated(dst, 20 * MiB, 12 * MiB) == 0);
    CHECK(TopAllocated(dst, 4 * MiB, 1 * MiB) == 1 * MiB);
    CHECK(TopAllocated(dst, 8 * MiB, 1 * MiB) == 1 * MiB);
    CHECK(TopAllocated(dst, 16 * MiB, 1 * MiB) == 1 * MiB);
  }
}

TEST_CASE("mirror top: pivot onto a target with target.backing; later writes land in the target only") {
  RequireMountTools();
  TopRig r;
  // The base as the destination sees it: a copy next to the target, named relatively.
  std::string base2 = r.dst_dir + "/base-copy.qcow2";
  Must({"cp", r.base, base2});
  std::string dst = r.dst_dir + "/top.qcow2";
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  r.MustMirror({"start", r.Job(R"({"id": "p", "sync": "top", "target": {"path": ")" + dst +
                               R"(", "backing": "base-copy.qcow2"}})"),
                "--wait"});
  r.MustMirror({"complete", "p"});
  CHECK(RunTimed({"qemu-img", "info", r.img}).exit_code == 0);  // unlocked at once
  std::string before = Sha256File(r.img);
  {
    Fd fd(r.mp, O_RDWR);
    std::vector<char> b(65536, 0x77);
    REQUIRE(PwriteAll(fd.get(), b.data(), b.size(), 2 * MiB));
    REQUIRE(::fsync(fd.get()) == 0);
    // Reads through the pivoted mount come from the target's own base.
    CHECK(ReadRange(r.mp, 0, 4096) == std::vector<char>(4096, static_cast<char>(0xb0)));
  }
  CHECK(Sha256File(r.img) == before);
  CHECK_UNMOUNTS(g);
  CheckClean(r.img);
  CheckClean(dst);
  CHECK(BackingOf(dst) == "base-copy.qcow2");
  QemuIo(dst, {"read -P 0xb0 0 2M", "read -P 0x77 2M 64k", "read -P 0x41 4M 1M", "read -P 0 8M 1M",
               "read -P 0xb0 9M 15M"});
  CHECK(TopAllocated(dst, 0, 2 * MiB) == 0);
}

TEST_CASE("mirror top: bad target.backing is refused with one line and nothing is created") {
  RequireMountTools();
  TopRig r;
  std::string dst = r.dst_dir + "/top.qcow2";
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  struct Bad {
    std::string json, expect;
  } bad[] = {
      {R"({"sync": "top", "target": {"path": ")" + dst + R"(", "backing": "/nonexistent/base.qcow2"}})",
       "target.backing /nonexistent/base.qcow2: No such file"},
      {R"({"sync": "top", "target": {"path": ")" + dst + R"(", "backing": ")" + r.img + R"("}})",
       "is the source image itself"},
      {R"({"sync": "top", "target": {"path": ")" + dst + R"(", "format": "raw"}})", "sync: \"top\" needs a new qcow2"},
  };
  for (const auto& b : bad) r.ExpectRefused(b.json, b.expect);
  CHECK(::access(dst.c_str(), F_OK) != 0);
  CHECK(g.Status(false).exit_code == 0);
  CHECK_UNMOUNTS(g);
  CheckClean(r.img);
}

TEST_CASE("mirror top: an image without a backing file copies everything; target.backing is refused") {
  RequireMountTools();
  MirrorRig r;
  QemuImgCreate(r.img, "8M");
  QemuIo(r.img, {"write -P 0x11 1M 1M", "write -z 3M 1M"});
  std::string dst = r.s.File("dst.qcow2"), other = r.s.File("other.qcow2");
  QemuImgCreate(other, "8M");
  MountGuard g(r.mp, {"mount", "--socket", r.sock, r.img, r.mp}, r.sock);
  REQUIRE_MOUNTED(g);
  CmdResult res = r.Mirror(
      {"start", r.Job(R"({"sync": "top", "target": {"path": ")" + dst + R"(", "backing": ")" + other + R"("}})")});
  CHECK(res.exit_code == 1);
  CHECK(Contains(res.err, "the source has no backing file"));
  CHECK(::access(dst.c_str(), F_OK) != 0);
  r.MustMirror({"start", r.Job(R"({"id": "f", "sync": "top", "target": {"path": ")" + dst + R"("}})"), "--wait"});
  r.MustMirror({"complete", "f", "--no-pivot"});
  CHECK_UNMOUNTS(g);
  CheckClean(dst);
  CHECK(BackingOf(dst).empty());
  CheckSameContent(r.img, dst, "qcow2");
}
