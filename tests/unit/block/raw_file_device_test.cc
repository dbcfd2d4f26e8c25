#include "block/raw_file_device.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <string>
#include <vector>

#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::block {
namespace {

using qcowfs::testing::CmdResult;
using qcowfs::testing::RequireTool;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

void WriteFile(const std::string& path, const std::vector<uint8_t>& data) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size()));
  close(fd);
}

std::unique_ptr<RawFileDevice> OpenOrDie(const std::string& path, LockMode lock = LockMode::kNone,
                                         bool read_only = false) {
  auto r = RawFileDevice::Open(path, read_only, lock);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

bool AllZero(const std::vector<uint8_t>& v, size_t from, size_t to) {
  for (size_t i = from; i < to; ++i) {
    if (v[i] != 0) return false;
  }
  return true;
}

TEST_CASE("RawFileDevice: open errors name the file") {
  TempDir dir;
  auto r = RawFileDevice::Open(dir.File("missing"), false, LockMode::kNone);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().err() == ENOENT);
  CHECK(r.status().message().find("missing") != std::string::npos);

  auto d = RawFileDevice::Open(dir.path(), true, LockMode::kNone);
  REQUIRE_FALSE(d.ok());
  CHECK(d.status().err() == EISDIR);
}

TEST_CASE("RawFileDevice: reads past EOF are zeros") {
  TempDir dir;
  std::string path = dir.File("f");
  WriteFile(path, std::vector<uint8_t>(100, 0xab));
  auto dev = OpenOrDie(path);
  CHECK(dev->Size() == 100);
  std::vector<uint8_t> buf(200, 0xff);
  REQUIRE(dev->Read(50, buf.data(), buf.size()).ok());
  for (size_t i = 0; i < 50; ++i) REQUIRE(buf[i] == 0xab);
  CHECK(AllZero(buf, 50, 200));
  std::vector<uint8_t> far(4096, 0xff);
  REQUIRE(dev->Read(10 * kMiB, far.data(), far.size()).ok());
  CHECK(AllZero(far, 0, far.size()));
  CHECK(dev->Size() == 100);  // reading does not extend
}

TEST_CASE("RawFileDevice: write extends and reads back; read-only refuses writes") {
  TempDir dir;
  std::string path = dir.File("f");
  WriteFile(path, {});
  {
    auto dev = OpenOrDie(path);
    std::vector<uint8_t> data(10000);
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(i * 7);
    REQUIRE(dev->Write(kMiB + 3, data.data(), data.size()).ok());
    CHECK(dev->Size() == kMiB + 3 + data.size());
    REQUIRE(dev->Flush().ok());
    std::vector<uint8_t> back(data.size());
    REQUIRE(dev->Read(kMiB + 3, back.data(), back.size()).ok());
    CHECK(back == data);
    std::vector<uint8_t> head(kMiB);
    REQUIRE(dev->Read(0, head.data(), head.size()).ok());
    CHECK(AllZero(head, 0, head.size()));
    REQUIRE(dev->Resize(2 * kMiB).ok());
    CHECK(dev->Size() == 2 * kMiB);
  }
  auto ro = OpenOrDie(path, LockMode::kNone, /*read_only=*/true);
  CHECK(ro->read_only());
  uint8_t b = 1;
  Status s = ro->Write(0, &b, 1);
  CHECK(s.err() == EROFS);
  CHECK(ro->Flush().ok());
}

TEST_CASE("RawFileDevice: discard punches a hole and frees blocks") {
  TempDir dir;
  std::string path = dir.File("f");
  WriteFile(path, std::vector<uint8_t>(4 * kMiB, 0x5a));
  auto dev = OpenOrDie(path);
  REQUIRE(dev->Flush().ok());
  uint64_t before = dev->AllocatedBytes();
  CHECK(before >= 4 * kMiB);
  REQUIRE(dev->Discard(kMiB, 2 * kMiB).ok());
  CHECK(dev->Size() == 4 * kMiB);
  CHECK(dev->AllocatedBytes() <= before - 2 * kMiB);
  std::vector<uint8_t> buf(4 * kMiB);
  REQUIRE(dev->Read(0, buf.data(), buf.size()).ok());
  CHECK(buf[kMiB - 1] == 0x5a);
  CHECK(AllZero(buf, kMiB, 3 * kMiB));
  CHECK(buf[3 * kMiB] == 0x5a);

  // Discard past EOF is a no-op and never extends.
  REQUIRE(dev->Discard(8 * kMiB, kMiB).ok());
  CHECK(dev->Size() == 4 * kMiB);

  // WriteZeroes with unmap past EOF extends the file, reads zeros.
  REQUIRE(dev->WriteZeroes(4 * kMiB, kMiB, /*may_unmap=*/true).ok());
  CHECK(dev->Size() == 5 * kMiB);
  // Without unmap, the range reads zeros too.
  REQUIRE(dev->WriteZeroes(0, 64 * kKiB, /*may_unmap=*/false).ok());
  std::vector<uint8_t> z(64 * kKiB, 1);
  REQUIRE(dev->Read(0, z.data(), z.size()).ok());
  CHECK(AllZero(z, 0, z.size()));
}

TEST_CASE("RawFileDevice: block status reports data and holes") {
  TempDir dir;
  std::string path = dir.File("f");
  WriteFile(path, std::vector<uint8_t>(64 * kKiB, 1));
  auto dev = OpenOrDie(path);
  REQUIRE(dev->Resize(kMiB).ok());  // [64K, 1M) is a hole
  std::vector<uint8_t> tail(64 * kKiB, 2);
  REQUIRE(dev->Write(kMiB - 64 * kKiB, tail.data(), tail.size()).ok());

  auto s0 = dev->GetBlockStatus(0, kMiB);
  REQUIRE(s0.ok());
  CHECK(s0->type == ExtentType::kData);
  CHECK(s0->length == 64 * kKiB);

  auto s1 = dev->GetBlockStatus(64 * kKiB, kMiB);
  REQUIRE(s1.ok());
  CHECK(s1->type == ExtentType::kZero);
  CHECK(s1->length == kMiB - 128 * kKiB);

  auto s2 = dev->GetBlockStatus(kMiB - 64 * kKiB, kMiB);
  REQUIRE(s2.ok());
  CHECK(s2->type == ExtentType::kData);
  CHECK(s2->length == 64 * kKiB);  // clamped to EOF

  auto s3 = dev->GetBlockStatus(2 * kMiB, 4096);
  REQUIRE(s3.ok());
  CHECK(s3->type == ExtentType::kZero);
  CHECK(s3->length == 4096);

  auto s4 = dev->GetBlockStatus(0, 4096);  // never longer than asked
  REQUIRE(s4.ok());
  CHECK(s4->length == 4096);
}

TEST_CASE("RawFileDevice: image locks between our own opens") {
  TempDir dir;
  std::string path = dir.File("img");
  WriteFile(path, std::vector<uint8_t>(4096, 0));

  SUBCASE("shared + shared") {
    auto a = OpenOrDie(path, LockMode::kShared, true);
    auto b = OpenOrDie(path, LockMode::kShared, true);
    CHECK(a != nullptr);
    CHECK(b != nullptr);
  }
  SUBCASE("shared then exclusive fails") {
    auto a = OpenOrDie(path, LockMode::kShared, true);
    auto b = RawFileDevice::Open(path, false, LockMode::kExclusive);
    REQUIRE_FALSE(b.ok());
    CHECK(b.status().err() == EAGAIN);
    CHECK(b.status().message().find(path) != std::string::npos);
  }
  SUBCASE("exclusive then shared fails") {
    auto a = OpenOrDie(path, LockMode::kExclusive);
    auto b = RawFileDevice::Open(path, true, LockMode::kShared);
    REQUIRE_FALSE(b.ok());
    CHECK(b.status().err() == EAGAIN);
  }
  SUBCASE("exclusive then exclusive fails; released on close") {
    {
      auto a = OpenOrDie(path, LockMode::kExclusive);
      auto b = RawFileDevice::Open(path, false, LockMode::kExclusive);
      REQUIRE_FALSE(b.ok());
      CHECK(b.status().err() == EAGAIN);
      auto c = RawFileDevice::Open(path, false, LockMode::kNone);  // no locks: allowed
      CHECK(c.ok());
    }
    auto again = OpenOrDie(path, LockMode::kExclusive);
    CHECK(again != nullptr);
  }
}

TEST_CASE("RawFileDevice: locks are QEMU-compatible") {
  RequireTool("qemu-img");
  RequireTool("qemu-io");
  TempDir dir;
  std::string path = dir.File("img.qcow2");
  CmdResult c = RunCommand({"qemu-img", "create", "-q", "-f", "qcow2", path, "1M"});
  REQUIRE_MESSAGE(c.exit_code == 0, c.err);

  SUBCASE("exclusive holder blocks qemu-img info, -U still works") {
    auto dev = OpenOrDie(path, LockMode::kExclusive);
    CmdResult info = RunCommand({"qemu-img", "info", path});
    CHECK(info.exit_code != 0);
    CHECK_MESSAGE(info.err.find("lock") != std::string::npos, info.err);
    CmdResult forced = RunCommand({"qemu-img", "info", "-U", path});
    CHECK_MESSAGE(forced.exit_code == 0, forced.err);
  }
  SUBCASE("shared holder allows qemu-img info, refuses qemu-io writes") {
    auto dev = OpenOrDie(path, LockMode::kShared, true);
    CmdResult info = RunCommand({"qemu-img", "info", path});
    CHECK_MESSAGE(info.exit_code == 0, info.err);
    CmdResult w = RunCommand({"qemu-io", "-c", "write 0 512", path});
    CHECK(w.exit_code != 0);
    CHECK_MESSAGE(w.err.find("lock") != std::string::npos, w.err);
  }
  SUBCASE("after close qemu-io can write") {
    { auto dev = OpenOrDie(path, LockMode::kExclusive); }
    CmdResult w = RunCommand({"qemu-io", "-c", "write 0 512", path});
    CHECK_MESSAGE(w.exit_code == 0, w.err);
  }
}

}  // namespace
}  // namespace qcowfs::block
