// `qcowfs create` and `qcowfs info` against qemu-img as the oracle.
#include <doctest/doctest.h>

#include <string>

#include "support/process.h"
#include "support/temp_dir.h"

using qcowfs::testing::QcowfsBin;
using qcowfs::testing::RequireTool;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

namespace {

bool Contains(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

int Lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_CASE("cli: create makes images qemu-img accepts, for each cluster size") {
  RequireTool("qemu-img");
  TempDir dir;
  for (const char* cs : {"512", "4K", "64K", "2M"}) {
    std::string img = dir.File(std::string("c") + cs + ".qcow2");
    auto r = RunCommand({QcowfsBin(), "create", "--cluster-size", cs, img, "3G"});
    REQUIRE_MESSAGE(r.exit_code == 0, r.err);
    auto check = RunCommand({"qemu-img", "check", img});
    CHECK_MESSAGE(check.exit_code == 0, (check.out + check.err));
    auto info = RunCommand({"qemu-img", "info", "--output=json", img});
    REQUIRE(info.exit_code == 0);
    CHECK(Contains(info.out, "\"virtual-size\": 3221225472"));
    uint64_t bytes = std::string(cs) == "512" ? 512 : std::string(cs) == "4K" ? 4096 : std::string(cs) == "64K" ? 65536 : 2097152;
    CHECK(Contains(info.out, "\"cluster-size\": " + std::to_string(bytes)));
    // qemu-io can write to it and the result stays clean.
    auto w = RunCommand({"qemu-io", "-c", "write -P 7 1M 1M", img});
    CHECK(w.exit_code == 0);
    CHECK(RunCommand({"qemu-img", "check", img}).exit_code == 0);
  }
}

TEST_CASE("cli: create with a backing file, info shows the chain") {
  RequireTool("qemu-img");
  TempDir dir;
  std::string base = dir.File("base.qcow2"), top = dir.File("top.qcow2");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", base, "8M"}).exit_code == 0);
  REQUIRE(RunCommand({"qemu-io", "-c", "write -P 0x42 0 1M", base}).exit_code == 0);
  // SIZE 0 takes the backing file's size; the name is stored as given (relative).
  auto r = RunCommand({QcowfsBin(), "create", "--backing", "base.qcow2", "--backing-format", "qcow2", top, "0"});
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  auto info = RunCommand({"qemu-img", "info", "--output=json", top});
  CHECK(Contains(info.out, "\"backing-filename\": \"base.qcow2\""));
  CHECK(Contains(info.out, "\"backing-filename-format\": \"qcow2\""));
  CHECK(Contains(info.out, "\"virtual-size\": 8388608"));
  CHECK(RunCommand({"qemu-img", "compare", base, top}).exit_code == 0);
  auto ours = RunCommand({QcowfsBin(), "info", "--json", top});
  REQUIRE_MESSAGE(ours.exit_code == 0, ours.err);
  CHECK(Contains(ours.out, "\"backing-filename\": \"base.qcow2\""));
  CHECK(Contains(ours.out, "base.qcow2 (qcow2)"));
  CHECK(Contains(ours.out, "\"virtual-size\": 8388608"));
}

TEST_CASE("cli: info reports features and snapshots of qemu-made images") {
  RequireTool("qemu-img");
  TempDir dir;
  std::string img = dir.File("f.qcow2");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", "-o",
                      "lazy_refcounts=on,extended_l2=on,refcount_bits=64,compression_type=zstd", img, "1G"})
              .exit_code == 0);
  REQUIRE(RunCommand({"qemu-img", "snapshot", "-c", "before-upgrade", img}).exit_code == 0);
  auto r = RunCommand({QcowfsBin(), "info", img});
  REQUIRE_MESSAGE(r.exit_code == 0, r.err);
  CHECK(Contains(r.out, "virtual size: 1 GiB (1073741824 bytes)"));
  CHECK(Contains(r.out, "lazy_refcounts"));
  CHECK(Contains(r.out, "extended_l2"));
  CHECK(Contains(r.out, "refcount bits: 64"));
  CHECK(Contains(r.out, "compression type: zstd"));
  CHECK(Contains(r.out, "before-upgrade"));
  auto j = RunCommand({QcowfsBin(), "info", "--json", img});
  CHECK(Contains(j.out, "\"name\": \"before-upgrade\""));
  CHECK(Contains(j.out, "\"compat\": \"1.1\""));
}

TEST_CASE("cli: errors are one line with the right exit code, and change nothing") {
  RequireTool("qemu-img");
  TempDir dir;
  std::string img = dir.File("x.qcow2");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", img, "1M"}).exit_code == 0);
  std::string sha = qcowfs::testing::Sha256File(img);
  struct Case {
    std::vector<std::string> args;
    int code;
    const char* needle;
  } cases[] = {
      {{"create", img, "1G"}, 1, "x.qcow2"},                       // exists: never overwritten
      {{"create", dir.File("y.qcow2"), "12Q"}, 2, "12Q"},          // bad size
      {{"create", "--cluster-size", "3000", dir.File("y.qcow2"), "1G"}, 2, "cluster-size"},
      {{"create", dir.File("y.qcow2")}, 2, "SIZE"},
      {{"info", dir.File("missing.qcow2")}, 1, "missing.qcow2"},
      {{"info", "--bogus", img}, 2, "bogus"},
      {{"frobnicate"}, 2, "frobnicate"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> argv = {QcowfsBin()};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    auto r = RunCommand(argv);
    CAPTURE(c.args.front());
    CHECK(r.exit_code == c.code);
    CHECK(Lines(r.err) == 1);
    CHECK(Contains(r.err, c.needle));
  }
  CHECK(qcowfs::testing::Sha256File(img) == sha);
  CHECK(RunCommand({"test", "-e", dir.File("y.qcow2")}).exit_code != 0);
  // A non-image is refused by name.
  std::string junk = dir.File("junk.bin");
  REQUIRE(RunCommand({"dd", "if=/dev/zero", "of=" + junk, "bs=4k", "count=4", "status=none"}).exit_code == 0);
  auto r = RunCommand({QcowfsBin(), "info", junk});
  CHECK(r.exit_code == 1);
  CHECK(Contains(r.err, "not a qcow2 image"));
}

TEST_CASE("cli: --help and --version") {
  CHECK(RunCommand({QcowfsBin(), "--version"}).exit_code == 0);
  for (const char* cmd : {"create", "info", "mount", "status"}) {
    auto r = RunCommand({QcowfsBin(), cmd, "--help"});
    CAPTURE(cmd);
    CHECK(r.exit_code == 0);
    CHECK(Contains(r.out, "Usage: qcowfs"));
  }
}
