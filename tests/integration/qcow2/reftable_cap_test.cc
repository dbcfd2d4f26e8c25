// The refcount table's size limit: QEMU refuses to open an image whose refcount table is
// over 8 MiB (QCOW_MAX_REFTABLE_SIZE, "Reference count table too large"), so the engine
// never grows one past that, and refuses such a header itself.
//
// Reaching the limit cheaply: 512-byte clusters with 64-bit refcounts (64 clusters per
// refcount block), and a full 8 MiB table (1M entries) whose entries all point at one
// refcount block that gives every cluster refcount 1. Every host cluster the table can
// describe is then in use; the next allocation needs a cluster past them, and a table
// entry past the limit.
#include <doctest/doctest.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "qcow2/image.h"
#include "support/must.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "util/endian.h"

namespace {

using qcowfs::LoadBE32;
using qcowfs::StoreBE32;
using qcowfs::StoreBE64;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::CmdResult;
using qcowfs::testing::Must;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

constexpr uint64_t kCluster = 512;
constexpr uint64_t kMaxReftableBytes = 8ull << 20;

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE(f.good());
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  REQUIRE(f.good());
}

std::vector<uint8_t> ReadHeader(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> b(kCluster);
  f.read(reinterpret_cast<char*>(b.data()), static_cast<std::streamsize>(b.size()));
  REQUIRE(f.good());
  return b;
}

uint64_t ReadBE64At(const std::string& path, uint64_t off) {
  std::ifstream f(path, std::ios::binary);
  f.seekg(static_cast<std::streamoff>(off));
  uint8_t b[8] = {};
  f.read(reinterpret_cast<char*>(b), 8);
  REQUIRE(f.good());
  return qcowfs::LoadBE64(b);
}

// A 1M image whose refcount table is `clusters` clusters long, every entry naming one
// refcount block that gives every cluster refcount 1 (with last_missing, all but the
// last entry, which is 0: the last 64 clusters the table can describe are free).
std::string MakeFullImage(const TempDir& dir, const std::string& name, uint32_t clusters,
                          bool last_missing = false) {
  const std::string img = dir.File(name);
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "1M"});
  std::vector<uint8_t> b = ReadFile(img);
  REQUIRE(LoadBE32(&b[20]) == 9);
  const uint64_t table = (b.size() + kCluster - 1) / kCluster * kCluster;
  const uint64_t block = table + uint64_t{clusters} * kCluster;
  b.resize(block + kCluster, 0);
  for (uint64_t i = 0; i < uint64_t{clusters} * kCluster / 8; i++) StoreBE64(&b[table + 8 * i], block);
  if (last_missing) StoreBE64(&b[block - 8], 0);
  for (uint64_t i = 0; i < kCluster / 8; i++) StoreBE64(&b[block + 8 * i], 1);
  StoreBE64(&b[48], table);
  StoreBE32(&b[56], clusters);
  WriteFile(img, b);
  return img;
}

TEST_CASE("refcount table: growing it past 8 MiB fails with ENOSPC naming the image; the header stays valid") {
  qcowfs::testing::RequireTool("qemu-img");
  TempDir dir("qcowfs-reftable");
  const std::string img = MakeFullImage(dir, "full.qcow2", kMaxReftableBytes / kCluster);
  Must({"qemu-img", "info", img});  // exactly 8 MiB: QEMU opens it
  const std::vector<uint8_t> header_before = ReadHeader(img);
  {
    auto r = Qcow2Image::Open(img, OpenOptions{});
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    std::vector<uint8_t> data(kCluster, 0x5a);
    qcowfs::Status s = r.value()->Write(0, data.data(), data.size());
    CHECK_MESSAGE(!s.ok(), "a write needing a refcount table over 8 MiB succeeded");
    if (!s.ok()) {
      CHECK(s.err() == ENOSPC);
      CHECK(s.message().find(img) != std::string::npos);
      CHECK(s.message().find("refcount table") != std::string::npos);
      CHECK(s.message().find('\n') == std::string::npos);
    }
    CHECK(r.value()->Close().ok());
  }
  CHECK_MESSAGE(ReadHeader(img) == header_before, "the header changed");
  CmdResult info = RunCommand({"qemu-img", "info", img});
  CHECK_MESSAGE(info.exit_code == 0, info.out << info.err);
}

TEST_CASE("refcount table: an allocation stopped by the limit leaves no refcount block it placed") {
  // The last table entry is free: growing the L1 table (512 clusters, from the start of
  // the last block's span) places that block outside its span, then needs an entry
  // past the limit. The placed block must go again: nothing counts it.
  qcowfs::testing::RequireTool("qemu-img");
  TempDir dir("qcowfs-reftable");
  const uint32_t clusters = kMaxReftableBytes / kCluster;
  const std::string img = MakeFullImage(dir, "last.qcow2", clusters, /*last_missing=*/true);
  const uint64_t table = ReadBE64At(img, 48);
  const uint64_t last_entry = table + kMaxReftableBytes - 8;
  REQUIRE(ReadBE64At(img, last_entry) == 0);
  const std::vector<uint8_t> header_before = ReadHeader(img);
  {
    auto r = Qcow2Image::Open(img, OpenOptions{});
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    qcowfs::Status s = r.value()->Resize(1ull << 30);  // an L1 table of 256 KiB
    CHECK_MESSAGE(!s.ok(), "an L1 growth needing a refcount table over 8 MiB succeeded");
    if (!s.ok()) CHECK(s.err() == ENOSPC);
    CHECK(r.value()->Close().ok());
  }
  CHECK_MESSAGE(ReadBE64At(img, last_entry) == 0, "a refcount block placed by the failed allocation stayed");
  CHECK(ReadHeader(img) == header_before);
  CmdResult info = RunCommand({"qemu-img", "info", img});
  CHECK_MESSAGE(info.exit_code == 0, info.out << info.err);
}

TEST_CASE("refcount table: a header claiming more than 8 MiB is refused in one line, as by QEMU") {
  qcowfs::testing::RequireTool("qemu-img");
  TempDir dir("qcowfs-reftable");
  const std::string img = MakeFullImage(dir, "big.qcow2", kMaxReftableBytes / kCluster + 1);
  CmdResult q = RunCommand({"qemu-img", "info", img});
  CHECK(q.exit_code != 0);
  CHECK_MESSAGE(q.err.find("too large") != std::string::npos, q.err);
  for (bool ro : {false, true}) {
    CAPTURE(ro);
    OpenOptions o;
    o.read_only = ro;
    auto r = Qcow2Image::Open(img, o);
    REQUIRE_FALSE(r.ok());
    const std::string& m = r.status().message();
    CHECK(m.find(img) == 0);
    CHECK(m.find("refcount table too large") != std::string::npos);
    CHECK(m.find('\n') == std::string::npos);
  }
}

}  // namespace
