// Invalid extended-L2 subcluster bitmaps, with QEMU as the oracle (qemu-io on a copy of
// the same file). QEMU's qcow2_get_subcluster_type makes a whole entry invalid when one
// subcluster is both allocated and zero, or when an unallocated cluster (host offset 0)
// has any allocation bit; every read of the cluster then fails with EIO, and so does a
// data write (QEMU marks the image corrupt then). It ignores the bitmap of a compressed
// cluster on reads (only `qemu-img check` reports it). The images come from qemu-img and
// qemu-io; the bitmaps are patched by hand.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "qcow2/image.h"
#include "support/must.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "util/endian.h"

namespace {

namespace fs = std::filesystem;
using qcowfs::LoadBE64;
using qcowfs::StoreBE64;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::CmdResult;
using qcowfs::testing::Must;
using qcowfs::testing::RunCommand;
using qcowfs::testing::Sha256File;
using qcowfs::testing::TempDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t kCluster = 64 * KiB;
constexpr uint64_t kAllocBit = 1;
constexpr uint64_t kZeroBit = 1ull << 32;

std::vector<uint8_t> ReadAt(const std::string& path, uint64_t off, size_t n) {
  std::vector<uint8_t> b(n);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pread(fd, b.data(), n, static_cast<off_t>(off)) == static_cast<ssize_t>(n));
  close(fd);
  return b;
}

void WriteAt(const std::string& path, uint64_t off, const std::vector<uint8_t>& b) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pwrite(fd, b.data(), b.size(), static_cast<off_t>(off)) == static_cast<ssize_t>(b.size()));
  close(fd);
}

// Host offset of guest cluster gc's 16-byte L2 entry (first L2 table only).
uint64_t EntryOffset(const std::string& img, uint64_t gc) {
  uint64_t l1_off = LoadBE64(ReadAt(img, 40, 8).data());
  uint64_t l2_off = LoadBE64(ReadAt(img, l1_off, 8).data()) & 0x00fffffffffffe00ull;
  REQUIRE(l2_off != 0);
  return l2_off + 16 * gc;
}

uint64_t Bitmap(const std::string& img, uint64_t gc) {
  return LoadBE64(ReadAt(img, EntryOffset(img, gc) + 8, 8).data());
}

void SetBitmap(const std::string& img, uint64_t gc, uint64_t bitmap) {
  std::vector<uint8_t> b(8);
  StoreBE64(b.data(), bitmap);
  WriteAt(img, EntryOffset(img, gc) + 8, b);
}

bool CorruptBit(const std::string& img) { return (LoadBE64(ReadAt(img, 72, 8).data()) & 2) != 0; }

// Cluster 0: data 0x11; cluster 1: subclusters 0-3 data 0x22; cluster 2: compressed 0x33;
// cluster 3: unallocated.
std::string MakeBase(const TempDir& dir) {
  std::string img = dir.File("base.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", img, "1M"});
  Must({"qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 64k 8k", "-c",
        "write -c -P 0x33 128k 64k", img});
  REQUIRE(Bitmap(img, 1) == 0xf);
  REQUIRE(Bitmap(img, 2) == 0);
  REQUIRE(Bitmap(img, 3) == 0);
  return img;
}

struct Case {
  const char* name;
  uint64_t gc;
  uint64_t bitmap;
  bool qemu_invalid;  // what QEMU 7.2 says (checked below, not assumed)
  int pattern;        // what a valid read of the probed bytes gives
};

// The probed reads of a case: a subcluster the bitmap names, and one it does not.
std::vector<uint64_t> Probes(const Case& c) { return {c.gc * kCluster, c.gc * kCluster + 40 * KiB}; }

const Case kCases[] = {
    {"subcluster 0 allocated and zero", 1, 0xf | kZeroBit, true, -1},
    {"subcluster 9 allocated and zero (bit not in the written range)", 1, 0xf | (kAllocBit << 9) | (kZeroBit << 9),
     true, -1},
    {"allocation bit on an unallocated cluster", 3, kAllocBit << 5, true, -1},
    {"allocation and zero bit on an unallocated cluster", 3, kAllocBit | kZeroBit, true, -1},
    {"compressed cluster with a nonzero bitmap", 2, 0x1 | (kZeroBit << 3), false, 0x33},
    {"control: zero bits on subclusters without data", 1, 0xf | (0xf0ull << 32), false, -1},
};

TEST_CASE("extended L2: invalid subcluster bitmaps read as EIO, as in QEMU, and change nothing") {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
  TempDir dir("qcowfs-extl2");
  const std::string base = MakeBase(dir);
  for (const Case& c : kCases) {
    const std::string name = c.name;
    CAPTURE(name);
    const std::string img = dir.File("img.qcow2");
    fs::copy_file(base, img, fs::copy_options::overwrite_existing);
    SetBitmap(img, c.gc, c.bitmap);
    const std::string before = Sha256File(img);

    for (uint64_t off : Probes(c)) {
      CAPTURE(off);
      // The oracle: qemu-io, read-only (a writable QEMU would mark the image corrupt).
      CmdResult q = RunCommand({"qemu-io", "-r", "-f", "qcow2", "-c", "read " + std::to_string(off) + " 2k", img});
      const bool qemu_eio = q.out.find("read failed: Input/output error") != std::string::npos;
      INFO("qemu-io: " << q.out << q.err);
      REQUIRE(qemu_eio == c.qemu_invalid);

      for (bool ro : {true, false}) {
        CAPTURE(ro);
        OpenOptions o;
        o.read_only = ro;
        auto r = Qcow2Image::Open(img, o);
        REQUIRE_MESSAGE(r.ok(), r.status().message());
        std::vector<uint8_t> buf(2 * KiB, 0xee);
        qcowfs::Status s = r.value()->Read(off, buf.data(), buf.size());
        if (qemu_eio) {
          CHECK_MESSAGE(!s.ok(), "our read succeeded where QEMU's fails with EIO");
          if (!s.ok()) {
            CHECK(s.err() == EIO);
            CHECK(s.message().find(img) != std::string::npos);
          }
          // Block status says the same (a mirror would otherwise copy it as zeros).
          auto bs = r.value()->GetBlockStatus(off, 2 * KiB);
          CHECK_MESSAGE(!bs.ok(), "block status reported an invalid cluster as readable");
          if (!bs.ok()) CHECK(bs.status().err() == EIO);
        } else {
          REQUIRE_MESSAGE(s.ok(), s.message());
          // Valid: the bytes QEMU reads (qemu-io checks the pattern).
          const int want = c.pattern >= 0 ? c.pattern : (off % kCluster < 8 * KiB ? 0x22 : 0);
          CmdResult v = RunCommand({"qemu-io", "-r", "-U", "-f", "qcow2", "-c",
                                    "read -P " + std::to_string(want) + " " + std::to_string(off) + " 2k", img});
          CHECK_MESSAGE(v.out.find("Pattern verification failed") == std::string::npos, v.out << v.err);
          CHECK_MESSAGE(v.exit_code == 0, v.out << v.err);
          CHECK(buf == std::vector<uint8_t>(buf.size(), static_cast<uint8_t>(want)));
        }
        CHECK(r.value()->Close().ok());
      }
    }
    CHECK_MESSAGE(Sha256File(img) == before, "the image changed");
  }
}

TEST_CASE("extended L2: a data write into an invalid entry fails with EIO, as in QEMU, and never fixes it") {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
  TempDir dir("qcowfs-extl2");
  const std::string base = MakeBase(dir);
  for (const Case& c : kCases) {
    if (!c.qemu_invalid) continue;
    const std::string name = c.name;
    CAPTURE(name);
    // Into a subcluster the bitmap names as data (an in-place write if it were valid),
    // and into one it does not.
    for (uint64_t off : {c.gc * kCluster + 2 * KiB, c.gc * kCluster + 40 * KiB}) {
      CAPTURE(off);
      const std::string ours = dir.File("ours.qcow2"), theirs = dir.File("theirs.qcow2");
      fs::copy_file(base, ours, fs::copy_options::overwrite_existing);
      SetBitmap(ours, c.gc, c.bitmap);
      fs::copy_file(ours, theirs, fs::copy_options::overwrite_existing);

      CmdResult q = RunCommand({"qemu-io", "-f", "qcow2", "-c", "write -P 0x55 " + std::to_string(off) + " 2k", theirs});
      INFO("qemu-io: " << q.out << q.err);
      REQUIRE(q.out.find("write failed: Input/output error") != std::string::npos);

      const std::vector<uint8_t> entry = ReadAt(ours, EntryOffset(ours, c.gc), 16);
      {
        auto r = Qcow2Image::Open(ours, OpenOptions{});
        REQUIRE_MESSAGE(r.ok(), r.status().message());
        std::vector<uint8_t> data(2 * KiB, 0x55);
        qcowfs::Status s = r.value()->Write(off, data.data(), data.size());
        CHECK_MESSAGE(!s.ok(), "our write succeeded where QEMU's fails with EIO");
        if (!s.ok()) CHECK(s.err() == EIO);
        (void)r.value()->Close();
      }
      CHECK_MESSAGE(ReadAt(ours, EntryOffset(ours, c.gc), 16) == entry, "the L2 entry changed");
      CHECK(CorruptBit(ours) == CorruptBit(theirs));
    }
  }
}

}  // namespace

// What qemu-io reads from each subcluster of cluster gc: 16 bytes in hex, or the error.
std::string QemuView(const std::string& img, uint64_t gc) {
  std::vector<std::string> argv = {"qemu-io", "-r", "-U", "-f", "qcow2"};
  for (uint64_t s = 0; s < 32; s++) {
    argv.push_back("-c");
    argv.push_back("read -v " + std::to_string(gc * kCluster + s * 2 * KiB + 1000) + " 16");
  }
  argv.push_back(img);
  CmdResult r = RunCommand(argv);
  std::string view, line;
  for (char ch : r.out + "\n--\n" + r.err + "\n") {
    if (ch != '\n') {
      line += ch;
      continue;
    }
    if (line.find(" sec (") == std::string::npos) view += line + "\n";  // drop timings
    line.clear();
  }
  return view;
}

TEST_CASE("extended L2: zeroing and discarding an invalid entry do what QEMU does") {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
  TempDir dir("qcowfs-extl2");
  const std::string base = MakeBase(dir);
  struct Op {
    const char* qemu;  // qemu-io command, offsets relative to the cluster
    uint64_t in, len;
    bool discard, unmap;
  };
  const Op kOps[] = {
      {"write -z", 0, kCluster, false, false},     // whole cluster: the entry is replaced
      {"write -z -u", 0, kCluster, false, true},   // whole cluster, unmapped
      {"discard", 0, kCluster, true, true},        // whole cluster
      {"write -z", 0, 8 * KiB, false, false},      // whole subclusters 0-3: their bits change
      {"write -z", 16 * KiB, 8 * KiB, false, false},  // subclusters 8-11
  };
  for (const Case& c : kCases) {
    if (!c.qemu_invalid) continue;
    const std::string name = c.name;
    CAPTURE(name);
    for (const Op& op : kOps) {
      const std::string what = std::string(op.qemu) + " +" + std::to_string(op.in) + " " + std::to_string(op.len);
      CAPTURE(what);
      const std::string ours = dir.File("ours.qcow2"), theirs = dir.File("theirs.qcow2");
      fs::copy_file(base, ours, fs::copy_options::overwrite_existing);
      SetBitmap(ours, c.gc, c.bitmap);
      fs::copy_file(ours, theirs, fs::copy_options::overwrite_existing);
      const uint64_t off = c.gc * kCluster + op.in;
      CmdResult q = RunCommand({"qemu-io", "-f", "qcow2", "-c",
                                std::string(op.qemu) + " " + std::to_string(off) + " " + std::to_string(op.len), theirs});
      INFO("qemu-io: " << q.out << q.err);
      const bool qemu_ok = q.exit_code == 0 && q.out.find("failed") == std::string::npos;
      {
        auto r = Qcow2Image::Open(ours, OpenOptions{});
        REQUIRE_MESSAGE(r.ok(), r.status().message());
        qcowfs::Status s = op.discard ? r.value()->Discard(off, op.len) : r.value()->WriteZeroes(off, op.len, op.unmap);
        INFO("ours: " << s.message());
        CHECK(s.ok() == qemu_ok);
        CHECK(r.value()->Close().ok());
      }
      CHECK(CorruptBit(ours) == CorruptBit(theirs));
      // Both read the same, subcluster by subcluster (EIO included).
      CHECK(QemuView(ours, c.gc) == QemuView(theirs, c.gc));
      CmdResult check = RunCommand({"qemu-img", "check", ours});
      CmdResult their_check = RunCommand({"qemu-img", "check", theirs});
      INFO("check ours: " << check.out << check.err << "\ncheck QEMU's: " << their_check.out << their_check.err);
      CHECK((check.exit_code == 0 || check.exit_code == 3) == (their_check.exit_code == 0 || their_check.exit_code == 3));
    }
  }
}
