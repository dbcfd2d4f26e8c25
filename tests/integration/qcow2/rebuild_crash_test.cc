// A crash during the refcount rebuild of a dirty lazy-refcounts image that has a
// persistent bitmap (made by qemu-img and qemu-io). The rebuild counts only what it
// knows; the bitmaps' clusters get refcount 0, so the header that switches to the new
// refcounts must also clear the bitmaps' autoclear bit (QEMU then ignores them), in the
// same write. Stopped at every write of the open, with the unflushed writes lost or a
// random part of them kept, the file must pass `qemu-img check` (leaks allowed) and
// open again with the data intact.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qcow2/image.h"
#include "support/fault_injection_device.h"
#include "support/mem_device.h"
#include "support/must.h"
#include "support/process.h"
#include "support/temp_dir.h"
#include "util/endian.h"

namespace {

using qcowfs::LoadBE64;
using qcowfs::StoreBE64;
using qcowfs::qcow2::OpenDevices;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::CmdResult;
using qcowfs::testing::FaultInjectionDevice;
using qcowfs::testing::MemDevice;
using qcowfs::testing::Must;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr uint64_t kIncompatOff = 72;
constexpr uint64_t kAutoclearOff = 88;

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

std::unique_ptr<MemDevice> ToMem(const std::vector<uint8_t>& bytes) {
  auto m = std::make_unique<MemDevice>();
  REQUIRE(m->Write(0, bytes.data(), bytes.size()).ok());
  return m;
}

qcowfs::Result<std::unique_ptr<Qcow2Image>> OpenOnDevice(qcowfs::block::BlockDevice* host) {
  OpenDevices d;
  d.host = host;
  d.name = "rebuild";
  OpenOptions o;
  o.lock = false;
  return Qcow2Image::OpenOn(d, o);
}

}  // namespace

namespace qcowfs {
namespace {

TEST_CASE("rebuild: a crash at any write of the refcount rebuild leaves no refcount errors (persistent bitmap)") {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
  TempDir dir("qcowfs-rebuild");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "4M"});
  Must({"qemu-img", "bitmap", "--add", img, "b0"});
  // The enabled bitmap records these writes; qemu-io stores it (table and data clusters).
  Must({"qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 256k", "-c", "write -P 0x42 1M 64k", img});
  CmdResult info = Must({"qemu-img", "info", "--output=json", img});
  REQUIRE_MESSAGE(info.out.find("\"b0\"") != std::string::npos, info.out);
  {
    CmdResult c = RunCommand({"qemu-img", "check", img});
    REQUIRE_MESSAGE(c.exit_code == 0, c.out << c.err);
  }
  std::vector<uint8_t> bytes = ReadFile(img);
  REQUIRE((LoadBE64(&bytes[kAutoclearOff]) & 1) == 1);
  // Dirty, as after a crash of a lazy-refcounts writer: a writable open rebuilds.
  StoreBE64(&bytes[kIncompatOff], LoadBE64(&bytes[kIncompatOff]) | 1);

  std::vector<uint8_t> expected(4 * MiB, 0);
  std::fill(expected.begin(), expected.begin() + 256 * KiB, 0x41);
  std::fill(expected.begin() + MiB, expected.begin() + MiB + 64 * KiB, 0x42);

  // How many mutating calls (writes and flushes) a whole writable open makes.
  uint64_t ops = 0;
  {
    auto mem = ToMem(bytes);
    FaultInjectionDevice dev(*mem);
    auto r = OpenOnDevice(&dev);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    ops = dev.writes() + dev.flushes();
    REQUIRE(ops >= 4);  // refcount blocks, table, flush, header...
  }

  const std::string crashed = dir.File("crashed.qcow2");
  for (uint64_t n = 0; n <= ops; n++) {
    for (int mode = 0; mode < 4; mode++) {  // 0: unflushed writes lost; 1-3: a random part kept
      CAPTURE(n);
      CAPTURE(mode);
      auto mem = ToMem(bytes);
      FaultInjectionDevice dev(*mem);
      dev.FailWritesAfter(static_cast<int>(n));
      auto r = OpenOnDevice(&dev);
      std::mt19937_64 rng(1000 * n + mode);
      dev.Crash(&rng, mode == 0);
      dev.FailWritesAfter(0);  // a still open image writes nothing more while it goes away
      if (r.ok()) r.value().reset();
      dev.FailWritesAfter(-1);
      WriteFile(crashed, dev.LiveContents());

      CmdResult c = RunCommand({"qemu-img", "check", crashed});
      INFO("qemu-img check: " << c.out << c.err);
      CHECK((c.exit_code == 0 || c.exit_code == 3));
      CHECK(c.err.find("ERROR") == std::string::npos);

      // And the engine opens it again (rebuilding if still dirty) with the data intact.
      auto again = OpenOnDevice(&dev);
      REQUIRE_MESSAGE(again.ok(), again.status().ToString());
      std::vector<uint8_t> got(4 * MiB);
      REQUIRE(again.value()->Read(0, got.data(), got.size()).ok());
      CHECK(got == expected);
      REQUIRE(again.value()->Close().ok());
      REQUIRE(dev.Flush().ok());
      WriteFile(crashed, dev.LiveContents());
      CmdResult c2 = RunCommand({"qemu-img", "check", crashed});
      INFO("qemu-img check after reopening: " << c2.out << c2.err);
      CHECK((c2.exit_code == 0 || c2.exit_code == 3));
    }
  }
}

}  // namespace
}  // namespace qcowfs
