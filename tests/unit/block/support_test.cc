// Tests for the test devices themselves: the crash and race tests rely on these semantics.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "support/blocking_device.h"
#include "support/fault_injection_device.h"
#include "support/mem_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::testing {
namespace {

using block::ExtentType;

constexpr uint64_t kChunk = MemDevice::kChunkSize;

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 13);
  return v;
}

std::vector<uint8_t> ReadAll(block::BlockDevice* dev, uint64_t off, size_t len) {
  std::vector<uint8_t> v(len);
  REQUIRE(dev->Read(off, v.data(), len).ok());
  return v;
}

TEST_CASE("MemDevice: sparse reads, writes, size") {
  MemDevice dev;
  CHECK(dev.Size() == 0);
  CHECK(dev.AllocatedBytes() == 0);
  auto p = Pattern(100, 1);
  REQUIRE(dev.Write(kChunk - 50, p.data(), p.size()).ok());  // straddles two chunks
  CHECK(dev.Size() == kChunk + 50);
  CHECK(dev.AllocatedBytes() == 2 * kChunk);
  CHECK(ReadAll(&dev, kChunk - 50, 100) == p);
  auto zeros = ReadAll(&dev, 5 * kChunk, 10);  // past the end
  CHECK(zeros == std::vector<uint8_t>(10, 0));

  auto contents = dev.Contents();
  REQUIRE(contents.size() == kChunk + 50);
  CHECK(contents[0] == 0);
  CHECK(std::memcmp(contents.data() + kChunk - 50, p.data(), 100) == 0);
}

TEST_CASE("MemDevice: discard, write zeroes, block status, resize") {
  MemDevice dev(8 * kChunk);
  auto p = Pattern(3 * kChunk, 7);
  REQUIRE(dev.Write(kChunk, p.data(), p.size()).ok());  // chunks 1..3
  CHECK(dev.AllocatedBytes() == 3 * kChunk);

  auto s = dev.GetBlockStatus(0, 8 * kChunk);
  REQUIRE(s.ok());
  CHECK(s->type == ExtentType::kZero);
  CHECK(s->length == kChunk);
  s = dev.GetBlockStatus(kChunk + 10, 8 * kChunk);
  REQUIRE(s.ok());
  CHECK(s->type == ExtentType::kData);
  CHECK(s->length == 3 * kChunk - 10);
  s = dev.GetBlockStatus(4 * kChunk, 100);
  REQUIRE(s.ok());
  CHECK(s->type == ExtentType::kZero);
  CHECK(s->length == 100);

  // Whole chunk freed; partial range zeroed but chunk kept.
  REQUIRE(dev.Discard(2 * kChunk, kChunk).ok());
  CHECK(dev.AllocatedBytes() == 2 * kChunk);
  REQUIRE(dev.WriteZeroes(kChunk, 100, true).ok());
  CHECK(dev.AllocatedBytes() == 2 * kChunk);
  auto r = ReadAll(&dev, kChunk, 3 * kChunk);
  CHECK(std::all_of(r.begin(), r.begin() + 100, [](uint8_t b) { return b == 0; }));
  CHECK(std::equal(r.begin() + 100, r.begin() + kChunk, p.begin() + 100));
  CHECK(std::all_of(r.begin() + kChunk, r.begin() + 2 * kChunk, [](uint8_t b) { return b == 0; }));
  CHECK(std::equal(r.begin() + 2 * kChunk, r.end(), p.begin() + 2 * kChunk));

  // Discard past the end does not extend; WriteZeroes does.
  REQUIRE(dev.Discard(100 * kChunk, kChunk).ok());
  CHECK(dev.Size() == 8 * kChunk);
  REQUIRE(dev.WriteZeroes(9 * kChunk, kChunk, false).ok());
  CHECK(dev.Size() == 10 * kChunk);

  // Shrink drops data; growing again reads zeros there.
  REQUIRE(dev.Resize(kChunk + 200).ok());
  CHECK(dev.Size() == kChunk + 200);
  REQUIRE(dev.Resize(8 * kChunk).ok());
  auto after = ReadAll(&dev, kChunk, 7 * kChunk);
  CHECK(std::all_of(after.begin(), after.begin() + 100, [](uint8_t b) { return b == 0; }));
  CHECK(std::equal(after.begin() + 100, after.begin() + 200, p.begin() + 100));
  CHECK(std::all_of(after.begin() + 200, after.end(), [](uint8_t b) { return b == 0; }));
  CHECK(dev.AllocatedBytes() == kChunk);
}

TEST_CASE("MemDevice: concurrent writers") {
  MemDevice dev;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&dev, t] {
      auto p = Pattern(4096, static_cast<uint8_t>(t));
      for (int i = 0; i < 200; ++i) {
        uint64_t off = (static_cast<uint64_t>(i) * 4 + t) * 4096;
        REQUIRE(dev.Write(off, p.data(), p.size()).ok());
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(dev.Size() == 800 * 4096);
  for (int t = 0; t < 4; ++t) {
    CHECK(ReadAll(&dev, static_cast<uint64_t>(t) * 4096, 4096) ==
          Pattern(4096, static_cast<uint8_t>(t)));
  }
}

TEST_CASE("FaultInjectionDevice: flushed data survives a crash, unflushed is dropped") {
  FaultInjectionDevice dev;
  auto a = Pattern(8192, 1);
  auto b = Pattern(8192, 2);
  REQUIRE(dev.Write(0, a.data(), a.size()).ok());
  REQUIRE(dev.Flush().ok());
  CHECK(dev.pending_ops() == 0);
  REQUIRE(dev.Write(0, b.data(), 4096).ok());
  REQUIRE(dev.Write(kChunk * 3, b.data(), b.size()).ok());
  REQUIRE(dev.Resize(kChunk * 10).ok());
  CHECK(dev.pending_ops() == 3);
  CHECK(ReadAll(&dev, 0, 4096) == std::vector<uint8_t>(b.begin(), b.begin() + 4096));
  CHECK(dev.Size() == kChunk * 10);

  dev.Crash(nullptr, /*drop_all=*/true);
  CHECK(dev.pending_ops() == 0);
  CHECK(dev.Size() == 8192);
  CHECK(ReadAll(&dev, 0, 8192) == a);
  CHECK(ReadAll(&dev, kChunk * 3, 100) == std::vector<uint8_t>(100, 0));
  CHECK(dev.LiveContents() == dev.DurableContents());

  // Usable after the crash.
  REQUIRE(dev.Write(0, b.data(), b.size()).ok());
  REQUIRE(dev.Flush().ok());
  dev.Crash(nullptr, true);
  CHECK(ReadAll(&dev, 0, 8192) == b);
}

TEST_CASE("FaultInjectionDevice: partial crash keeps a subset of pending ops in order") {
  std::mt19937_64 rng(12345);
  bool saw_kept = false, saw_dropped = false;
  for (int round = 0; round < 64; ++round) {
    FaultInjectionDevice dev;
    // Op i writes byte i+1 at offset i*4096; op 8 overwrites offset 0 with 0xee.
    for (int i = 0; i < 8; ++i) {
      uint8_t v = static_cast<uint8_t>(i + 1);
      REQUIRE(dev.Write(static_cast<uint64_t>(i) * 4096, &v, 1).ok());
    }
    uint8_t over = 0xee;
    REQUIRE(dev.Write(0, &over, 1).ok());
    dev.Crash(&rng, /*drop_all=*/false);
    CHECK(dev.pending_ops() == 0);
    for (int i = 1; i < 8; ++i) {
      uint8_t got = 0xff;
      if (static_cast<uint64_t>(i) * 4096 < dev.Size()) {
        REQUIRE(dev.Read(static_cast<uint64_t>(i) * 4096, &got, 1).ok());
      } else {
        got = 0;
      }
      CHECK((got == 0 || got == i + 1));
      (got == 0 ? saw_dropped : saw_kept) = true;
    }
    uint8_t first = 0;
    REQUIRE(dev.Read(0, &first, 1).ok());
    CHECK((first == 0 || first == 1 || first == 0xee));
    CHECK(dev.LiveContents() == dev.DurableContents());
  }
  CHECK(saw_kept);
  CHECK(saw_dropped);
}

TEST_CASE("FaultInjectionDevice: FailWritesAfter and counters") {
  FaultInjectionDevice dev(kChunk);
  uint8_t v = 1;
  dev.FailWritesAfter(2);
  CHECK(dev.Write(0, &v, 1).ok());
  CHECK(dev.Flush().ok());
  Status s = dev.Write(1, &v, 1);
  CHECK(s.err() == EIO);
  CHECK(dev.Flush().err() == EIO);
  CHECK(dev.Discard(0, 10).err() == EIO);
  uint8_t r = 0;
  CHECK(dev.Read(0, &r, 1).ok());  // reads keep working
  CHECK(r == 1);
  CHECK(dev.writes() == 1);
  CHECK(dev.flushes() == 1);
  CHECK(dev.failed_ops() == 3);
  CHECK(dev.reads() == 1);
  dev.FailWritesAfter(-1);
  CHECK(dev.Write(1, &v, 1).ok());
  dev.FailWritesAfter(0);
  CHECK(dev.Write(1, &v, 1).err() == EIO);
}

TEST_CASE("FaultInjectionDevice: starts from an initial image") {
  MemDevice init;
  auto p = Pattern(5000, 3);
  REQUIRE(init.Write(10, p.data(), p.size()).ok());
  FaultInjectionDevice dev(init);
  CHECK(dev.Size() == 5010);
  dev.Crash(nullptr, true);
  CHECK(ReadAll(&dev, 10, 5000) == p);
}

TEST_CASE("BlockingDevice: blocks a matching write until released") {
  MemDevice mem(kChunk);
  BlockingDevice dev(&mem);
  dev.Arm(/*on_read=*/false, /*on_write=*/true, 4096, 4096);

  // Non-matching requests pass: a read of the range, a write elsewhere.
  uint8_t v = 9;
  REQUIRE(dev.Write(0, &v, 1).ok());
  std::vector<uint8_t> buf(4096);
  REQUIRE(dev.Read(4096, buf.data(), buf.size()).ok());
  CHECK_FALSE(dev.blocked());

  std::atomic<bool> done{false};
  std::thread writer([&] {
    uint8_t w = 7;
    REQUIRE(dev.Write(8000, &w, 1).ok());
    done = true;
  });
  REQUIRE(dev.WaitUntilBlocked(10000));
  CHECK(dev.blocked());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(done.load());
  uint8_t got = 0xff;
  REQUIRE(mem.Read(8000, &got, 1).ok());
  CHECK(got == 0);  // not yet at the lower device

  // Other I/O continues while one is blocked (the trap fires once).
  REQUIRE(dev.Write(8001, &v, 1).ok());

  dev.Release();
  writer.join();
  CHECK(done.load());
  REQUIRE(mem.Read(8000, &got, 1).ok());
  CHECK(got == 7);
  CHECK_FALSE(dev.blocked());
  CHECK_FALSE(dev.WaitUntilBlocked(10));
}

TEST_CASE("BlockingDevice: read trap") {
  MemDevice mem(kChunk);
  BlockingDevice dev(&mem);
  dev.Arm(true, false, 0, 1);
  std::thread reader([&] {
    uint8_t b;
    REQUIRE(dev.Read(0, &b, 1).ok());
  });
  REQUIRE(dev.WaitUntilBlocked(10000));
  dev.Release();
  reader.join();
}

TEST_CASE("TempDir and RunCommand") {
  std::string path;
  {
    TempDir dir;
    path = dir.path();
    CmdResult r = RunCommand({"sh", "-c", "echo out; echo err >&2; exit 3"});
    CHECK(r.exit_code == 3);
    CHECK(r.out == "out\n");
    CHECK(r.err == "err\n");
    CmdResult t = RunCommand({"touch", dir.File("x")});
    CHECK(t.exit_code == 0);
    CHECK(Sha256File(dir.File("x")) ==
          "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  }
  CHECK(RunCommand({"test", "-e", path}).exit_code == 1);  // removed
  CHECK(RunCommand({"/nonexistent/binary"}).exit_code == 127);
  CmdResult pwd = RunCommand({"pwd"}, "/");
  CHECK(pwd.out == "/\n");
  CHECK(HaveTool("sh"));
  CHECK_FALSE(HaveTool("no-such-tool-qcowfs"));
}

}  // namespace
}  // namespace qcowfs::testing
