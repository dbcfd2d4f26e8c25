// Metadata overlap through the mount: an L2 entry edited to point at the L1 table.
// The write fails with EIO, the image is marked corrupt (qemu-img info says so), the L1
// bytes are unchanged, later writes fail, and the mount stays up for reads.
#include <doctest/doctest.h>

#include "integration/mount/mount_guard.h"
#include "util/endian.h"

namespace qm = qcowfs::testing::mount;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

namespace {

std::string ReadBytes(const std::string& path, uint64_t off, size_t n) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(off));
  std::string s(n, '\0');
  in.read(s.data(), static_cast<std::streamsize>(n));
  return s;
}

}  // namespace

TEST_CASE("stress: a write that would hit the L1 table marks the image corrupt and fails with EIO") {
  qm::RequireMountTools();
  TempDir dir;
  std::string img = dir.File("disk.qcow2"), mp = dir.File("disk.raw");
  REQUIRE(RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", img, "16M"}).exit_code == 0);
  REQUIRE(RunCommand({"qemu-io", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 1M 64k", img}).exit_code == 0);
  // Point guest cluster 0's L2 entry at the L1 table (keeping COPIED: a plain in-place write).
  std::string hdr = ReadBytes(img, 0, 104);
  uint64_t l1_off = qcowfs::LoadBE64(hdr.data() + 40);
  std::string l1 = ReadBytes(img, l1_off, 8);
  uint64_t l2_off = qcowfs::LoadBE64(l1.data()) & 0x00fffffffffffe00ull;
  {
    int fd = open(img.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    uint8_t e[8];
    qcowfs::StoreBE64(e, l1_off | (1ull << 63));
    REQUIRE(pwrite(fd, e, 8, static_cast<off_t>(l2_off)) == 8);
    close(fd);
  }
  const std::string l1_before = ReadBytes(img, l1_off, 65536);
  qm::WriteFileText(mp, "");
  {
    qm::MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MESSAGE(g.ok(), g.error());
    int fd = open(mp.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    std::vector<uint8_t> buf(4096, 0x99);
    errno = 0;
    CHECK(pwrite(fd, buf.data(), buf.size(), 0) < 0);
    CHECK(errno == EIO);
    CHECK(ReadBytes(img, l1_off, 65536) == l1_before);
    auto info = RunCommand({"qemu-img", "info", "-U", img});
    CHECK_MESSAGE(qm::Contains(info.out, "corrupt: true"), info.out);
    // Later writes fail, even to healthy clusters; reads go on.
    errno = 0;
    CHECK(pwrite(fd, buf.data(), buf.size(), 1 << 20) < 0);
    CHECK(errno == EIO);
    std::vector<uint8_t> rd(65536);
    REQUIRE(pread(fd, rd.data(), rd.size(), 1 << 20) == 65536);
    CHECK(std::all_of(rd.begin(), rd.end(), [](uint8_t b) { return b == 0x22; }));
    close(fd);
    CHECK(ReadBytes(img, l1_off, 65536) == l1_before);
    std::string why = g.Unmount();
    CHECK_MESSAGE(why.empty(), why);
  }
  // The corrupt bit stays: a writable open is refused with a pointer to the repair.
  auto again = qm::RunTimed({qcowfs::testing::mount::Bin(), "mount", img, mp});
  CHECK(again.exit_code == 1);
  CHECK(qm::Contains(again.err, "corrupt"));
  CHECK(!qm::IsMounted(mp));
}
