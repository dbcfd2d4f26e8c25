// Damaged and unsupported images made by qemu-img and patched by hand: every open
// (read-write and read-only) fails with a one-line message naming the file, and never
// modifies the file. Plus: unknown autoclear bits are cleared only on a writable open, a
// corrupt image opens read-only only, and unknown header extensions survive a write.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qcow2/format.h"
#include "qcow2/header.h"
#include "qcow2/image.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "util/endian.h"

namespace {

using qcowfs::LoadBE32;
using qcowfs::LoadBE64;
using qcowfs::StoreBE32;
using qcowfs::StoreBE64;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::RunCommand;
using qcowfs::testing::Sha256File;
using qcowfs::testing::TempDir;

// Header field offsets (reference/qcow2.txt).
constexpr off_t kOffVersion = 4;
constexpr off_t kOffClusterBits = 20;
constexpr off_t kOffCrypt = 32;
constexpr off_t kOffL1Size = 36;
constexpr off_t kOffL1Table = 40;
constexpr off_t kOffRefTable = 48;
constexpr off_t kOffIncompat = 72;
constexpr off_t kOffAutoclear = 88;
constexpr off_t kOffHeaderLength = 100;

void QemuImg(const std::vector<std::string>& args) {
  qcowfs::testing::RequireTool("qemu-img");
  std::vector<std::string> argv = {"qemu-img"};
  argv.insert(argv.end(), args.begin(), args.end());
  auto r = RunCommand(argv);
  REQUIRE_MESSAGE(r.exit_code == 0, "qemu-img failed: " << r.out << r.err);
}

std::string MakeImage(const TempDir& dir, const std::string& name) {
  std::string p = dir.File(name);
  QemuImg({"create", "-q", "-f", "qcow2", p, "64M"});
  return p;
}

std::vector<uint8_t> ReadBytes(const std::string& path, off_t off, size_t n) {
  std::vector<uint8_t> b(n);
  int fd = open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ssize_t got = pread(fd, b.data(), n, off);
  close(fd);
  REQUIRE(got == static_cast<ssize_t>(n));
  return b;
}

void WriteBytes(const std::string& path, off_t off, const void* data, size_t n) {
  int fd = open(path.c_str(), O_WRONLY);
  REQUIRE(fd >= 0);
  ssize_t put = pwrite(fd, data, n, off);
  close(fd);
  REQUIRE(put == static_cast<ssize_t>(n));
}

void Put32(const std::string& path, off_t off, uint32_t v) {
  uint8_t b[4];
  StoreBE32(b, v);
  WriteBytes(path, off, b, 4);
}
void Put64(const std::string& path, off_t off, uint64_t v) {
  uint8_t b[8];
  StoreBE64(b, v);
  WriteBytes(path, off, b, 8);
}
uint64_t Get64(const std::string& path, off_t off) { return LoadBE64(ReadBytes(path, off, 8).data()); }

OpenOptions Opts(bool ro) {
  OpenOptions o;
  o.read_only = ro;
  return o;
}

struct OpenOutcome {
  bool crashed = false;  // the open (or the destruction of its result) killed the process
  int signal = 0;
  bool ok = false;
  int err = 0;
  std::string message;
};

// Qcow2Image::Open in a forked child, so that an engine crash fails this test instead of
// taking the whole test binary down. The child reports ok/errno/message through a pipe.
OpenOutcome OpenInChild(const std::string& path, bool ro) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  fflush(nullptr);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Plain default signal handling: doctest's crash handler must not report in the child.
    for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL}) signal(sig, SIG_DFL);
    close(fds[0]);
    std::string out;
    {
      auto r = Qcow2Image::Open(path, Opts(ro));
      out = r.ok() ? std::string("1 0 ") : "0 " + std::to_string(r.status().err()) + " " + r.status().message();
      if (r.ok()) (void)(*r)->Close();
    }  // the failed Result (and any image) is destroyed before reporting
    size_t off = 0;
    while (off < out.size()) {
      ssize_t n = write(fds[1], out.data() + off, out.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    close(fds[1]);
    _exit(0);
  }
  close(fds[1]);
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  int st = 0;
  REQUIRE(waitpid(pid, &st, 0) == pid);
  OpenOutcome o;
  if (WIFSIGNALED(st) || !WIFEXITED(st) || WEXITSTATUS(st) != 0 || got.size() < 4) {
    o.crashed = true;
    o.signal = WIFSIGNALED(st) ? WTERMSIG(st) : 0;
    return o;
  }
  o.ok = got[0] == '1';
  size_t sp = got.find(' ', 2);
  o.err = std::stoi(got.substr(2, sp - 2));
  o.message = got.substr(sp + 1);
  return o;
}

// Both opens fail with a one-line message that names the file and contains `word`; the
// file's bytes are unchanged.
void ExpectRefused(const std::string& path, const std::string& word = "") {
  const std::string before = Sha256File(path);
  REQUIRE(!before.empty());
  for (bool ro : {false, true}) {
    CAPTURE(ro);
    OpenOutcome r = OpenInChild(path, ro);
    if (r.crashed) {
      FAIL_CHECK("Qcow2Image::Open crashed (signal " << r.signal << ")");
      continue;
    }
    if (r.ok) {
      FAIL_CHECK("open succeeded");
      continue;
    }
    const std::string& m = r.message;
    CAPTURE(m);
    CHECK(r.err != 0);
    CHECK_FALSE(m.empty());
    CHECK(m.find('\n') == std::string::npos);
    CHECK(m.find(path) != std::string::npos);
    if (!word.empty()) CHECK(m.find(word) != std::string::npos);
  }
  CHECK(Sha256File(path) == before);
}

TEST_CASE("bad image: a pristine qemu-img image opens (control)") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "ok.qcow2");
  const std::string before = Sha256File(p);
  {
    auto r = Qcow2Image::Open(p, Opts(true));
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    CHECK((*r)->Size() == (64u << 20));
  }
  CHECK(Sha256File(p) == before);
  auto r = Qcow2Image::Open(p, Opts(false));
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  REQUIRE((*r)->Close().ok());
}

TEST_CASE("bad image: bad magic") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put32(p, 0, 0x12345678);
  ExpectRefused(p, "magic");
}

TEST_CASE("bad image: unsupported versions") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put32(p, kOffVersion, 1);
  ExpectRefused(p, "version");
  Put32(p, kOffVersion, 4);
  ExpectRefused(p, "version");
}

TEST_CASE("bad image: truncated header") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  REQUIRE(truncate(p.c_str(), 50) == 0);
  ExpectRefused(p);
  REQUIRE(truncate(p.c_str(), 0) == 0);
  ExpectRefused(p);
}

TEST_CASE("bad image: cluster_bits 30") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put32(p, kOffClusterBits, 30);
  ExpectRefused(p, "cluster_bits");
}

TEST_CASE("bad image: L1 table beyond EOF, overlapping the header, absurd size") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  const uint64_t l1 = Get64(p, kOffL1Table);
  Put64(p, kOffL1Table, 1ull << 40);
  ExpectRefused(p, "L1");
  Put64(p, kOffL1Table, 0);
  ExpectRefused(p, "L1");
  Put64(p, kOffL1Table, l1 + 512);  // unaligned
  ExpectRefused(p, "L1");
  Put64(p, kOffL1Table, l1);
  Put32(p, kOffL1Size, 0x7fffffff);
  ExpectRefused(p, "L1");
  Put32(p, kOffL1Size, 0);  // too small for 64 MiB
  ExpectRefused(p, "L1");
}

TEST_CASE("bad image: refcount table beyond EOF or overlapping the header") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put64(p, kOffRefTable, 1ull << 40);
  ExpectRefused(p, "refcount table");
  Put64(p, kOffRefTable, 0);
  ExpectRefused(p, "refcount table");
}

TEST_CASE("bad image: unknown incompatible bit and encryption") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put64(p, kOffIncompat, 0x20);
  ExpectRefused(p, "bit 5");
  Put64(p, kOffIncompat, 0);
  Put32(p, kOffCrypt, 1);
  ExpectRefused(p, "encrypt");
  Put32(p, kOffCrypt, 2);
  ExpectRefused(p, "encrypt");
}

TEST_CASE("bad image: corrupt bit refuses writable open, allows read-only") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  QemuImg({"resize", "-q", "-f", "qcow2", p, "64M"});
  {
    // Some data so the read-only open has something to read.
    auto w = Qcow2Image::Open(p, Opts(false));
    REQUIRE(w.ok());
    std::vector<uint8_t> buf(65536, 0x3c);
    REQUIRE((*w)->Write(1 << 20, buf.data(), buf.size()).ok());
    REQUIRE((*w)->Close().ok());
  }
  Put64(p, kOffIncompat, Get64(p, kOffIncompat) | qcowfs::qcow2::kIncompatCorrupt);
  const std::string before = Sha256File(p);
  OpenOutcome rw = OpenInChild(p, false);
  REQUIRE_FALSE_MESSAGE(rw.crashed, "writable open crashed, signal " << rw.signal);
  REQUIRE_FALSE(rw.ok);
  const std::string& m = rw.message;
  CAPTURE(m);
  CHECK(m.find("corrupt") != std::string::npos);
  CHECK(m.find("read-only") != std::string::npos);
  CHECK(m.find(p) != std::string::npos);
  CHECK(m.find('\n') == std::string::npos);
  {
    auto ro = Qcow2Image::Open(p, Opts(true));
    REQUIRE_MESSAGE(ro.ok(), ro.status().message());
    CHECK((*ro)->read_only());
    CHECK((*ro)->corrupt());
    std::vector<uint8_t> buf(65536);
    REQUIRE((*ro)->Read(1 << 20, buf.data(), buf.size()).ok());
    CHECK(buf[0] == 0x3c);
    CHECK(buf[65535] == 0x3c);
    CHECK_FALSE((*ro)->Write(0, buf.data(), 512).ok());
    CHECK((*ro)->Close().ok());
  }
  CHECK(Sha256File(p) == before);
}

TEST_CASE("bad image: backing chain loop") {
  TempDir dir("qcowfs-bad");
  std::string a = dir.File("a.qcow2");
  std::string b = dir.File("b.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", b, "64M"});
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", a, "64M"});
  const std::string sb = Sha256File(b);
  ExpectRefused(a, "loop");
  ExpectRefused(b, "loop");
  CHECK(Sha256File(b) == sb);
  // A self-loop.
  std::string c = dir.File("c.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "c.qcow2", "-F", "qcow2", c, "64M"});
  ExpectRefused(c, "loop");
  // Loop reached through an absolute path spelled differently.
  std::string d = dir.File("d.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", dir.path() + "/./d.qcow2", "-F", "qcow2", d,
           "64M"});
  ExpectRefused(d, "loop");
}

TEST_CASE("bad image: missing backing file and missing file") {
  TempDir dir("qcowfs-bad");
  std::string a = dir.File("a.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2", a, "64M"});
  ExpectRefused(a, "nothere.qcow2");
  // Without a backing format (probe path).
  std::string b = dir.File("b.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", b, "64M"});
  ExpectRefused(b, "gone.raw");

  std::string missing = dir.File("missing.qcow2");
  for (bool ro : {false, true}) {
    OpenOutcome r = OpenInChild(missing, ro);
    REQUIRE_FALSE_MESSAGE(r.crashed, "open crashed, signal " << r.signal);
    REQUIRE_FALSE(r.ok);
    const std::string& m = r.message;
    CAPTURE(m);
    CHECK(r.err == ENOENT);
    CHECK(m.find(missing) != std::string::npos);
    CHECK(m.find('\n') == std::string::npos);
  }
  CHECK(access(missing.c_str(), F_OK) != 0);  // not created by the open
}

// A dirty image (lazy refcounts, not closed cleanly) whose backing file is missing: the
// open fails before refcounts are rebuilt, so it must not touch the file; in particular
// it must not clear the dirty bit, which would leave wrong refcounts looking clean.
TEST_CASE("bad image: failed writable open of a dirty image leaves it dirty") {
  TempDir dir("qcowfs-bad");
  std::string base = MakeImage(dir, "base.qcow2");
  std::string top = dir.File("top.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "base.qcow2", "-F",
           "qcow2", top, "64M"});
  Put64(top, kOffIncompat, Get64(top, kOffIncompat) | qcowfs::qcow2::kIncompatDirty);
  REQUIRE(unlink(base.c_str()) == 0);
  ExpectRefused(top, "base.qcow2");
  CHECK((Get64(top, kOffIncompat) & qcowfs::qcow2::kIncompatDirty) != 0);
}

// qemu-img check is the oracle: the image is consistent, then a data cluster's refcount
// is cleared by hand (qemu-img check: exit 2, "refcount=0 reference=1").
TEST_CASE("bad image: CheckRefcounts finds a cluster in use with refcount 0, as qemu-img check does") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "rc.qcow2");
  auto qemu_io = [&](const std::string& cmd) {
    auto r = RunCommand({"qemu-io", "-f", "qcow2", "-c", cmd, p});
    REQUIRE_MESSAGE(r.exit_code == 0, cmd << ": " << r.out << r.err);
  };
  qcowfs::testing::RequireTool("qemu-io");
  qemu_io("write -P 0xaa 0 128k");
  qemu_io("write -c -P 0xcc 1M 64k");  // compressed
  QemuImg({"snapshot", "-c", "s1", p});
  qemu_io("write -P 0xbb 2M 64k");  // only in the active layer: refcount 1
  auto check_ok = [&](bool want_ok) {
    auto r = Qcow2Image::Open(p, Opts(true));
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    qcowfs::Status s = (*r)->CheckRefcounts();
    return std::make_pair(s.ok() == want_ok, s.message());
  };
  REQUIRE(RunCommand({"qemu-img", "check", p}).exit_code == 0);
  auto [consistent, none] = check_ok(true);
  CHECK_MESSAGE(consistent, none);

  // Host offset of guest 2M, from qemu-img map.
  auto map = RunCommand({"qemu-img", "map", "--output=json", "--start-offset=2M", "--max-length=64k", p});
  REQUIRE(map.exit_code == 0);
  size_t at = map.out.find("\"offset\": ");
  REQUIRE(at != std::string::npos);
  const uint64_t host = std::stoull(map.out.substr(at + 10));
  const uint64_t refblock = Get64(p, static_cast<off_t>(Get64(p, kOffRefTable)));
  const off_t entry = static_cast<off_t>(refblock + 2 * (host >> 16));  // refcount_bits 16, 64K clusters
  const std::vector<uint8_t> old = ReadBytes(p, entry, 2);
  REQUIRE((old[0] << 8 | old[1]) == 1);  // big endian
  const uint8_t zero[2] = {0, 0};
  WriteBytes(p, entry, zero, 2);
  auto chk = RunCommand({"qemu-img", "check", p});
  CHECK(chk.exit_code == 2);
  const std::string before = Sha256File(p);
  auto [found, msg] = check_ok(false);
  CHECK(found);
  CAPTURE(msg);
  CHECK(msg.find(p) != std::string::npos);
  CHECK(msg.find(std::to_string(host)) != std::string::npos);
  CHECK(msg.find("refcount is 0") != std::string::npos);
  CHECK(msg.find('\n') == std::string::npos);
  CHECK(Sha256File(p) == before);
  {
    auto r = Qcow2Image::Open(p, Opts(true));
    REQUIRE(r.ok());
    CHECK((*r)->CheckRefcounts(host).ok());  // the limit excludes the cluster
    CHECK_FALSE((*r)->CheckRefcounts(host + 65536).ok());
  }

  // Restore it, then point the L2 entry past the end of the file: an allocation
  // that grows the file would hand that cluster out again.
  const uint8_t one[2] = {0, 1};
  WriteBytes(p, entry, one, 2);
  REQUIRE(RunCommand({"qemu-img", "check", p}).exit_code == 0);
  const uint64_t l2 = Get64(p, static_cast<off_t>(Get64(p, kOffL1Table))) & qcowfs::qcow2::kL1OffsetMask;
  const off_t l2e = static_cast<off_t>(l2 + 8 * (2 << 20 >> 16));
  REQUIRE((Get64(p, l2e) & qcowfs::qcow2::kL2OffsetMask) == host);
  struct stat st {};
  REQUIRE(stat(p.c_str(), &st) == 0);
  const uint64_t past = (static_cast<uint64_t>(st.st_size) + 4 * 65536) & ~uint64_t{65535};
  Put64(p, l2e, (Get64(p, l2e) & ~qcowfs::qcow2::kL2OffsetMask) | past);
  CHECK(RunCommand({"qemu-img", "check", p}).exit_code == 2);
  auto [found2, msg2] = check_ok(false);
  CHECK(found2);
  CAPTURE(msg2);
  CHECK(msg2.find(std::to_string(past) + " (past the end of the file)") != std::string::npos);
}

// A refcount of 0 on a live L2 table: QEMU would hand that cluster out for the next new
// table and overwrite the old one. The allocator sees the table there and refuses.
TEST_CASE("bad image: an L2 table with refcount 0 is never handed out again") {
  TempDir dir("qcowfs-bad");
  std::string p = dir.File("l2rc.qcow2");
  QemuImg({"create", "-q", "-f", "qcow2", p, "1G"});
  qcowfs::testing::RequireTool("qemu-io");
  REQUIRE(RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 64k", p}).exit_code == 0);
  const uint64_t l2 = Get64(p, static_cast<off_t>(Get64(p, kOffL1Table))) & qcowfs::qcow2::kL1OffsetMask;
  REQUIRE(l2 != 0);
  const uint64_t refblock = Get64(p, static_cast<off_t>(Get64(p, kOffRefTable)));
  const uint8_t zero[2] = {0, 0};
  WriteBytes(p, static_cast<off_t>(refblock + 2 * (l2 >> 16)), zero, 2);
  const std::vector<uint8_t> table = ReadBytes(p, static_cast<off_t>(l2), 65536);
  {
    auto r = Qcow2Image::Open(p, Opts(false));
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    std::vector<uint8_t> buf(4096, 0x55);
    // 600M lies under the second L1 entry: its new L2 table needs a cluster.
    qcowfs::Status s = (*r)->Write(600ull << 20, buf.data(), buf.size());
    CAPTURE(s.message());
    CHECK(s.is_corruption());
    CHECK(s.message().find("refcount 0 but holds the active L2 table") != std::string::npos);
    CHECK((*r)->corrupt());
    CHECK_FALSE((*r)->Write(0, buf.data(), buf.size()).ok());  // later writes fail too
    (void)(*r)->Close();
  }
  CHECK(ReadBytes(p, static_cast<off_t>(l2), 65536) == table);
  auto info = RunCommand({"qemu-img", "info", "-U", p});
  CHECK(info.out.find("corrupt: true") != std::string::npos);
  auto rd = RunCommand({"qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0xaa 0 64k", p});
  CHECK_MESSAGE(rd.exit_code == 0, rd.out << rd.err);
  CHECK(rd.out.find("Pattern verification failed") == std::string::npos);
}

TEST_CASE("bad image: unknown autoclear bits cleared on writable open only") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  Put64(p, kOffAutoclear, 0x21);  // bitmaps (bit 0) without a bitmap extension + bit 5
  const std::string before = Sha256File(p);
  {
    auto ro = Qcow2Image::Open(p, Opts(true));
    REQUIRE_MESSAGE(ro.ok(), ro.status().message());
    REQUIRE((*ro)->Close().ok());
  }
  CHECK(Get64(p, kOffAutoclear) == 0x21);
  CHECK(Sha256File(p) == before);
  {
    auto rw = Qcow2Image::Open(p, Opts(false));
    REQUIRE_MESSAGE(rw.ok(), rw.status().message());
    REQUIRE((*rw)->Close().ok());
  }
  CHECK(Get64(p, kOffAutoclear) == 0);
  auto chk = RunCommand({"qemu-img", "check", "-q", p});
  CHECK_MESSAGE(chk.exit_code == 0, chk.out << chk.err);
}

TEST_CASE("bad image: an unknown header extension survives a writable open, write and close") {
  TempDir dir("qcowfs-bad");
  std::string p = MakeImage(dir, "a.qcow2");
  const uint32_t hlen = LoadBE32(ReadBytes(p, kOffHeaderLength, 4).data());
  REQUIRE(hlen >= 104);
  REQUIRE(Get64(p, 8) == 0);  // no backing file name to move
  // Existing extensions (qemu writes a feature-name table), up to the end marker.
  std::vector<uint8_t> c0 = ReadBytes(p, 0, 65536);
  size_t pos = hlen;
  while (LoadBE32(&c0[pos]) != 0) pos += 8 + ((LoadBE32(&c0[pos + 4]) + 7) & ~7u);
  std::vector<uint8_t> old_exts(c0.begin() + hlen, c0.begin() + pos);
  // New area: the unknown extension, the old ones, the end marker (zeros).
  std::vector<uint8_t> area(16 + old_exts.size() + 8, 0);
  StoreBE32(&area[0], 0x12345678);
  StoreBE32(&area[4], 5);
  std::memcpy(&area[8], "hello", 5);
  if (!old_exts.empty()) std::memcpy(&area[16], old_exts.data(), old_exts.size());
  WriteBytes(p, hlen, area.data(), area.size());
  {
    auto chk = RunCommand({"qemu-img", "check", "-q", p});
    REQUIRE_MESSAGE(chk.exit_code == 0, chk.out << chk.err);
  }
  {
    auto rw = Qcow2Image::Open(p, Opts(false));
    REQUIRE_MESSAGE(rw.ok(), rw.status().message());
    bool found = false;
    for (const auto& e : (*rw)->header().extensions)
      if (e.type == 0x12345678u) found = e.data == std::vector<uint8_t>{'h', 'e', 'l', 'l', 'o'};
    CHECK(found);
    std::vector<uint8_t> buf(1 << 20, 0x77);
    REQUIRE((*rw)->Write(0, buf.data(), buf.size()).ok());
    REQUIRE((*rw)->Resize(128ull << 20).ok());  // rewrites the header's size field
    REQUIRE((*rw)->Write((128ull << 20) - buf.size(), buf.data(), buf.size()).ok());
    REQUIRE((*rw)->Close().ok());
  }
  std::vector<uint8_t> after = ReadBytes(p, hlen, area.size());
  CHECK(after == area);
  CHECK(Get64(p, 24) == (128ull << 20));
  auto chk = RunCommand({"qemu-img", "check", "-q", p});
  CHECK_MESSAGE(chk.exit_code == 0, chk.out << chk.err);
  auto info = RunCommand({"qemu-img", "info", p});
  CHECK(info.exit_code == 0);
}

}  // namespace
