// RawFileDevice in direct mode (--cache none, O_DIRECT): unaligned requests against a
// model, the read-modify-write race on shared host blocks, size/resize, punch, block
// status, flush, and refusal by a filesystem without O_DIRECT.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "block/raw_file_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::block {
namespace {

using qcowfs::testing::TempDir;

constexpr uint64_t kKiB = 1024;

std::unique_ptr<RawFileDevice> OpenDirect(const std::string& path, uint32_t min_align = 0, bool unsafe = false) {
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  close(fd);
  DirectIo dio;
  dio.enabled = true;
  dio.min_align = min_align;
  dio.unsafe_no_block_lock = unsafe;
  auto r = RawFileDevice::Open(path, false, LockMode::kNone, dio);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

// The file's bytes through the page cache (another fd, not O_DIRECT).
std::vector<uint8_t> FileBytes(const std::string& path) {
  std::vector<uint8_t> out;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  uint8_t buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) out.insert(out.end(), buf, buf + n);
  close(fd);
  return out;
}

TEST_CASE("direct: the fd has O_DIRECT and an alignment") {
  TempDir dir;
  auto dev = OpenDirect(dir.File("f"));
  CHECK(dev->direct());
  CHECK((fcntl(dev->fd(), F_GETFL) & O_DIRECT) != 0);
  CHECK(dev->align() >= 512);
  CHECK((dev->align() & (dev->align() - 1)) == 0);
  auto forced = OpenDirect(dir.File("g"), 4096);
  CHECK(forced->align() == 4096);
}

// Every offset/length pattern near host block edges, with aligned and misaligned
// buffers, against a byte model; the file is also checked through the page cache.
TEST_CASE("direct: unaligned reads and writes near block edges match a model") {
  for (uint32_t align : {0u, 4096u}) {
    CAPTURE(align);
    TempDir dir;
    const std::string path = dir.File("f");
    auto dev = OpenDirect(path, align);
    const uint64_t a = dev->align();
    const uint64_t file = 8 * a;
    std::vector<uint8_t> model(file, 0);
    std::vector<uint8_t> init(file);
    for (size_t i = 0; i < file; i++) init[i] = static_cast<uint8_t>(i * 31 + 7);
    REQUIRE(dev->Write(0, init.data(), init.size()).ok());
    model = init;

    std::vector<uint64_t> offs = {0, 1, 7, 511, 512, 513, a - 1, a, a + 1, 2 * a - 512, 2 * a - 1, 3 * a + 100};
    std::vector<uint64_t> lens = {1, 8, 511, 512, 513, a - 1, a, a + 1, 2 * a - 1, 2 * a, 2 * a + 3, 3 * a + 511};
    uint8_t gen = 1;
    std::vector<uint8_t> store(4 * a + 2 * 4096 + 1024);  // a page-aligned base, + 512, + the longest length
    for (uint64_t off : offs) {
      for (uint64_t len : lens) {
        for (size_t mis : {size_t{0}, size_t{1}, size_t{512}}) {
          if (off + len > file) continue;
          CAPTURE(off);
          CAPTURE(len);
          CAPTURE(mis);
          // Buffer at a page-aligned base + mis.
          uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(store.data()) + 4095) & ~uintptr_t{4095});
          REQUIRE(base + mis + len <= store.data() + store.size());
          uint8_t* p = base + mis;
          gen++;
          for (uint64_t i = 0; i < len; i++) p[i] = static_cast<uint8_t>(gen + i * 13);
          REQUIRE(dev->Write(off, p, len).ok());
          std::memcpy(model.data() + off, p, len);
          std::memset(p, 0xee, len);
          REQUIRE(dev->Read(off, p, len).ok());
          REQUIRE(std::memcmp(p, model.data() + off, len) == 0);
          // A read of different bounds over the same area.
          uint64_t roff = off > 3 ? off - 3 : 0;
          uint64_t rlen = std::min<uint64_t>(len + 7, file - roff);
          REQUIRE(dev->Read(roff, p, rlen).ok());
          REQUIRE(std::memcmp(p, model.data() + roff, rlen) == 0);
        }
      }
    }
    CHECK(dev->Size() == file);
    CHECK(FileBytes(path) == model);
  }
}

// Many threads write disjoint 512-byte pieces of the same 4K host blocks, each piece
// again and again with new contents. Returns how many pieces lost their last write.
size_t RunPieceRace(RawFileDevice* dev, int rounds) {
  constexpr int kThreads = 8;   // piece t of every block belongs to thread t
  constexpr int kBlocks = 16;
  constexpr uint64_t kPiece = 512;
  constexpr uint64_t kBlock = 4096;
  std::vector<uint8_t> zero(kBlocks * kBlock, 0);
  REQUIRE(dev->Write(0, zero.data(), zero.size()).ok());
  std::atomic<bool> go{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      while (!go.load()) std::this_thread::yield();
      std::vector<uint8_t> buf(kPiece);
      for (int r = 1; r <= rounds; r++) {
        for (int b = 0; b < kBlocks; b++) {
          std::memset(buf.data(), (t * 31 + r) & 0xff, kPiece);
          Status s = dev->Write(b * kBlock + t * kPiece, buf.data(), kPiece);
          if (!s.ok()) return;
        }
      }
    });
  }
  go = true;
  for (auto& th : threads) th.join();
  std::vector<uint8_t> back(kBlocks * kBlock);
  REQUIRE(dev->Read(0, back.data(), back.size()).ok());
  size_t lost = 0;
  for (int b = 0; b < kBlocks; b++)
    for (int t = 0; t < kThreads; t++) {
      const uint8_t want = static_cast<uint8_t>((t * 31 + rounds) & 0xff);
      const uint8_t* p = back.data() + b * kBlock + t * kPiece;
      for (uint64_t i = 0; i < kPiece; i++)
        if (p[i] != want) {
          lost++;
          break;
        }
    }
  return lost;
}

TEST_CASE("direct: concurrent writes of different bytes of one host block lose nothing") {
  TempDir dir;
  auto dev = OpenDirect(dir.File("f"), 4096);
  REQUIRE(dev->align() == 4096);
  CHECK(RunPieceRace(dev.get(), 200) == 0);
}

// An aligned writer rewrites whole blocks with an increasing generation while an RMW
// writer changes their first 512 bytes: the last aligned write must survive in the
// bytes the RMW does not write (no RMW may write back a block it read before it).
size_t RunAlignedVsRmw(RawFileDevice* dev, int rounds) {
  constexpr int kBlocks = 8;
  constexpr uint64_t kBlock = 4096;
  std::atomic<bool> stop{false};
  std::thread rmw([&] {
    std::vector<uint8_t> b(512, 0xff);
    while (!stop.load())
      for (int i = 0; i < kBlocks; i++) (void)dev->Write(i * kBlock, b.data(), b.size());
  });
  std::vector<uint8_t> blk(kBlocks * kBlock);
  uint8_t last = 0;
  for (int r = 1; r <= rounds; r++) {
    last = static_cast<uint8_t>(r % 250 + 1);
    std::memset(blk.data(), last, blk.size());
    for (int i = 0; i < kBlocks; i++) REQUIRE(dev->Write(i * kBlock, blk.data() + i * kBlock, kBlock).ok());
  }
  stop = true;
  rmw.join();
  std::vector<uint8_t> back(kBlocks * kBlock);
  REQUIRE(dev->Read(0, back.data(), back.size()).ok());
  size_t bad = 0;
  for (int i = 0; i < kBlocks; i++)
    for (uint64_t j = 512; j < kBlock; j++)
      if (back[i * kBlock + j] != last) {
        bad++;
        break;
      }
  return bad;
}

TEST_CASE("direct: aligned writes are ordered against a read-modify-write of their blocks") {
  TempDir dir;
  auto dev = OpenDirect(dir.File("f"), 4096);
  for (int i = 0; i < 20; i++) REQUIRE(RunAlignedVsRmw(dev.get(), 100) == 0);
}

// Without the per-block serialization the race test must see lost bytes, or it proves
// nothing. The race is timing-dependent: try for a few seconds.
TEST_CASE("direct: unsafe_no_block_lock reproduces the lost update") {
  TempDir dir;
  auto dev = OpenDirect(dir.File("f"), 4096, /*unsafe=*/true);
  size_t lost = 0;
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (lost == 0 && std::chrono::steady_clock::now() < until) lost = RunPieceRace(dev.get(), 50);
  CHECK_MESSAGE(lost > 0, "without the per-block lock concurrent RMW should lose pieces (test cannot catch the bug)");
}

TEST_CASE("direct: size, resize and writes past the end") {
  TempDir dir;
  const std::string path = dir.File("f");
  auto dev = OpenDirect(path, 4096);
  CHECK(dev->Size() == 0);
  std::vector<uint8_t> b(100, 0x42);
  REQUIRE(dev->Write(10000, b.data(), b.size()).ok());
  // A bounced write past the end leaves the file at the end of its host block.
  CHECK(dev->Size() >= 10100);
  CHECK(dev->Size() <= 12288);
  std::vector<uint8_t> back(16384, 0xee);
  REQUIRE(dev->Read(0, back.data(), back.size()).ok());
  for (size_t i = 0; i < back.size(); i++) REQUIRE(back[i] == ((i >= 10000 && i < 10100) ? 0x42 : 0));
  // Shrink to a size inside a host block: reads stop there (zeros after).
  REQUIRE(dev->Resize(10050).ok());
  CHECK(dev->Size() == 10050);
  REQUIRE(dev->Read(8192, back.data(), 4096).ok());
  for (size_t i = 0; i < 4096; i++) REQUIRE(back[i] == ((i >= 1808 && i < 1858) ? 0x42 : 0));
  // A write into the partial last block keeps what is below the end.
  REQUIRE(dev->Write(10049, b.data(), 2).ok());
  REQUIRE(dev->Read(10000, back.data(), 60).ok());
  for (size_t i = 0; i < 60; i++) REQUIRE(back[i] == (i < 51 ? 0x42 : 0));
  // Grow: zeros.
  REQUIRE(dev->Resize(1 << 20).ok());
  CHECK(dev->Size() == (1u << 20));
  REQUIRE(dev->Read((1 << 20) - 4097, back.data(), 4097).ok());
  for (size_t i = 0; i < 4097; i++) REQUIRE(back[i] == 0);
  REQUIRE(dev->Flush().ok());
  auto fb = FileBytes(path);
  REQUIRE(fb.size() == (1u << 20));
  CHECK(fb[10000] == 0x42);
  CHECK(fb[10051] == 0);
}

TEST_CASE("direct: punch, write-zeroes and block status") {
  TempDir dir;
  const std::string path = dir.File("f");
  auto dev = OpenDirect(path, 4096);
  const uint64_t size = 1 << 20;
  std::vector<uint8_t> data(size, 0x5a);
  REQUIRE(dev->Write(0, data.data(), data.size()).ok());
  REQUIRE(dev->Flush().ok());
  const uint64_t before = dev->AllocatedBytes();
  // Unaligned punch: whole blocks freed, partial ends zeroed.
  REQUIRE(dev->Discard(64 * kKiB + 100, 256 * kKiB).ok());
  REQUIRE(dev->WriteZeroes(512 * kKiB + 7, 1000, false).ok());
  REQUIRE(dev->WriteZeroes(600 * kKiB, 64 * kKiB, true).ok());
  CHECK(dev->Size() == size);
  CHECK(dev->AllocatedBytes() < before);
  std::vector<uint8_t> model(size, 0x5a);
  std::memset(model.data() + 64 * kKiB + 100, 0, 256 * kKiB);
  std::memset(model.data() + 512 * kKiB + 7, 0, 1000);
  std::memset(model.data() + 600 * kKiB, 0, 64 * kKiB);
  std::vector<uint8_t> back(size);
  REQUIRE(dev->Read(0, back.data(), back.size()).ok());
  CHECK(back == model);
  CHECK(FileBytes(path) == model);
  // SEEK_DATA/SEEK_HOLE through the O_DIRECT fd.
  auto st = dev->GetBlockStatus(0, size);
  REQUIRE(st.ok());
  CHECK(st->type == ExtentType::kData);
  auto hole = dev->GetBlockStatus(600 * kKiB, 64 * kKiB);
  REQUIRE(hole.ok());
  CHECK(hole->type == ExtentType::kZero);
  // Concurrent RMW next to a punch: the punched range stays zero, the pieces stay.
  std::thread t([&] {
    std::vector<uint8_t> piece(512, 0x77);
    for (int i = 0; i < 200; i++) REQUIRE(dev->Write(800 * kKiB + 512, piece.data(), piece.size()).ok());
  });
  for (int i = 0; i < 200; i++) REQUIRE(dev->Discard(800 * kKiB + 1024, 3072).ok());
  t.join();
  REQUIRE(dev->Read(800 * kKiB, back.data(), 4096).ok());
  for (size_t i = 0; i < 4096; i++) REQUIRE(back[i] == (i < 512 ? 0x5a : i < 1024 ? 0x77 : 0));
  REQUIRE(dev->Flush().ok());
}

// A filesystem that refuses O_DIRECT (ramfs) fails the open with one line naming the file.
TEST_CASE("direct: a filesystem without O_DIRECT is refused by name") {
  TempDir dir;
  const std::string mnt = dir.File("ramfs");
  REQUIRE(mkdir(mnt.c_str(), 0755) == 0);
  if (mount("none", mnt.c_str(), "ramfs", 0, nullptr) != 0) {
    MESSAGE("cannot mount ramfs here (" << strerror(errno) << "); skipped");
    return;
  }
  const std::string path = mnt + "/img";
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  close(fd);
  DirectIo dio;
  dio.enabled = true;
  auto r = RawFileDevice::Open(path, false, LockMode::kNone, dio);
  CHECK_FALSE(r.ok());
  CHECK(r.status().err() == EINVAL);
  CHECK(r.status().message().find(path) != std::string::npos);
  CHECK(r.status().message().find("O_DIRECT") != std::string::npos);
  CHECK(r.status().message().find('\n') == std::string::npos);
  CHECK(RawFileDevice::Open(path, false, LockMode::kNone).ok());  // writeback still works
  umount2(mnt.c_str(), MNT_DETACH);
}

// A block device with 4K logical sectors (a loop device): the alignment is 4096 (statx
// STATX_DIOALIGN, or BLKSSZGET where the kernel does not report it for block devices).
TEST_CASE("direct: a 4K-sector block device gets 4K alignment and RMW") {
  if (!qcowfs::testing::HaveTool("losetup")) {
    MESSAGE("no losetup; skipped");
    return;
  }
  TempDir dir;
  const std::string backing = dir.File("loop.img");
  int fd = open(backing.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(ftruncate(fd, 4 << 20) == 0);
  close(fd);
  auto r = qcowfs::testing::RunCommand({"losetup", "--find", "--show", "--sector-size", "4096", backing});
  if (r.exit_code != 0) {
    MESSAGE("cannot set up a loop device (" << r.err << "); skipped");
    return;
  }
  std::string loop = r.out.substr(0, r.out.find('\n'));
  struct Detach {
    std::string dev;
    ~Detach() { (void)qcowfs::testing::RunCommand({"losetup", "-d", dev}); }
  } detach{loop};
  DirectIo dio;
  dio.enabled = true;
  auto dev = RawFileDevice::Open(loop, false, LockMode::kNone, dio);
  REQUIRE_MESSAGE(dev.ok(), dev.status().ToString());
  CHECK(dev.value()->align() == 4096);
  std::vector<uint8_t> piece(700, 0x3c), back(8192, 0xee);
  REQUIRE(dev.value()->Write(4096 + 1000, piece.data(), piece.size()).ok());
  REQUIRE(dev.value()->Flush().ok());
  REQUIRE(dev.value()->Read(4096, back.data(), back.size()).ok());
  for (size_t i = 0; i < back.size(); i++) REQUIRE(back[i] == ((i >= 1000 && i < 1700) ? 0x3c : 0));
}

}  // namespace
}  // namespace qcowfs::block
