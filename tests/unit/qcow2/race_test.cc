// Discard-during-rewrite race (SPEC §5, qemu-notes §3) and concurrency tests for the
// qcow2 engine, on in-memory host devices.
//
// The race scenarios hold one data request inside the host device (BlockingDevice) after
// the engine mapped it, discard its guest cluster, and allocate another guest cluster. The
// allocator must not hand out the discarded host cluster H while the held request still
// overlaps it. With OpenOptions::unsafe_ignore_inflight the same scenarios must show the
// bug (B lands on H), which proves that the tests catch it.
#include <doctest/doctest.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qcow2/create.h"
#include "qcow2/image.h"
#include "support/blocking_device.h"
#include "support/mem_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::qcow2 {
namespace {

using testing::BlockingDevice;
using testing::MemDevice;
using testing::RunCommand;
using testing::TempDir;

constexpr uint64_t kCluster = 64 * 1024;
constexpr uint64_t kA = 0;            // guest cluster A
constexpr uint64_t kB = 128 * 1024;   // guest cluster B

std::unique_ptr<Qcow2Image> OpenImage(block::BlockDevice* host, bool unsafe, const char* name) {
  OpenDevices d;
  d.host = host;
  d.name = name;
  OpenOptions o;
  o.lock = false;
  o.unsafe_ignore_inflight = unsafe;
  auto r = Qcow2Image::OpenOn(d, o);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

// Host offsets of every cluster-aligned run of kCluster bytes that all equal `byte`.
std::vector<uint64_t> ClustersFilledWith(const MemDevice& mem, uint8_t byte) {
  std::vector<uint8_t> all = mem.Contents();
  std::vector<uint64_t> out;
  for (uint64_t off = 0; off + kCluster <= all.size(); off += kCluster) {
    bool same = true;
    for (uint64_t i = 0; i < kCluster && same; i++) same = all[off + i] == byte;
    if (same) out.push_back(off);
  }
  return out;
}

bool AllBytes(const std::vector<uint8_t>& v, uint8_t b) {
  for (uint8_t x : v)
    if (x != b) return false;
  return true;
}

std::vector<uint8_t> ReadGuest(Qcow2Image* img, uint64_t off, uint64_t len) {
  std::vector<uint8_t> buf(len, 0xEE);
  Status s = img->Read(off, buf.data(), len);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
  return buf;
}

void WriteGuest(Qcow2Image* img, uint64_t off, uint64_t len, uint8_t byte) {
  std::vector<uint8_t> buf(len, byte);
  Status s = img->Write(off, buf.data(), len);
  REQUIRE_MESSAGE(s.ok(), s.ToString());
}

// Runs fn on another thread; false if it has not finished within timeout_ms (a
// deadlock with the held request). On timeout, on_timeout runs (to release the held
// request) and the call waits for fn to finish.
bool FinishesWithin(int timeout_ms, const std::function<void()>& fn,
                    const std::function<void()>& on_timeout) {
  auto fut = std::async(std::launch::async, fn);
  if (fut.wait_for(std::chrono::milliseconds(timeout_ms)) == std::future_status::ready) {
    fut.get();
    return true;
  }
  on_timeout();
  fut.get();
  return false;
}

struct CheckOutcome {
  int exit_code;
  std::string output;
};

// Writes the device to a file and runs `qemu-img check` on it.
CheckOutcome QemuCheck(const MemDevice& mem, bool json = false) {
  TempDir dir("qcowfs-race");
  std::string path = dir.File("img.qcow2");
  {
    std::vector<uint8_t> all = mem.Contents();
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(all.data()), static_cast<std::streamsize>(all.size()));
    REQUIRE(f.good());
  }
  std::vector<std::string> argv = {"qemu-img", "check", "-f", "qcow2"};
  if (json) argv.push_back("--output=json");
  argv.push_back(path);
  testing::CmdResult r = RunCommand(argv);
  return CheckOutcome{r.exit_code, r.out + r.err};
}

// Extracts "key": <integer> from qemu-img's JSON output; -1 if absent.
long long JsonInt(const std::string& json, const std::string& key) {
  auto pos = json.find("\"" + key + "\"");
  if (pos == std::string::npos) return -1;
  pos = json.find(':', pos);
  if (pos == std::string::npos) return -1;
  return std::strtoll(json.c_str() + pos + 1, nullptr, 10);
}

struct RaceRig {
  MemDevice mem;
  BlockingDevice blk{&mem};
  std::unique_ptr<Qcow2Image> img;
  uint64_t h = 0;  // host offset of guest cluster A

  explicit RaceRig(bool unsafe) {
    CreateOptions co;
    co.size = 1 << 20;
    co.cluster_bits = 16;
    Status s = CreateOn(&mem, co);
    REQUIRE_MESSAGE(s.ok(), s.ToString());
    img = OpenImage(&blk, unsafe, "race");
    WriteGuest(img.get(), kA, kCluster, 0x01);
    Status f = img->Flush();
    REQUIRE_MESSAGE(f.ok(), f.ToString());
    std::vector<uint64_t> hs = ClustersFilledWith(mem, 0x01);
    REQUIRE(hs.size() == 1);
    h = hs[0];
    // A is the only data cluster: nothing is free below H once A is discarded, so the
    // lowest-free-first allocator picks H for B unless the tracked request stops it.
  }
};

enum class Held { kRead, kWrite };

struct RaceResult {
  bool b_on_h = false;             // B's data was placed at host cluster H
  uint64_t b_host = UINT64_MAX;    // B's host offset (first 0x03 cluster found)
  std::vector<uint8_t> held_read;  // data returned by a held read
  std::vector<uint8_t> b_after;    // guest B after the held request finished
  std::vector<uint8_t> a_after;    // guest A after the held request finished
  CheckOutcome check{-1, ""};
};

RaceResult RunRace(Held held, bool unsafe) {
  RaceRig rig(unsafe);
  RaceResult res;
  Qcow2Image* img = rig.img.get();

  rig.blk.Arm(held == Held::kRead, held == Held::kWrite, rig.h, kCluster);
  std::vector<uint8_t> rbuf(kCluster, 0xEE);
  std::vector<uint8_t> wbuf(kCluster, 0x02);
  Status held_status;
  std::thread t([&] {
    held_status = held == Held::kRead ? img->Read(kA, rbuf.data(), kCluster)
                                      : img->Write(kA, wbuf.data(), kCluster);
  });
  bool blocked = rig.blk.WaitUntilBlocked(10000);
  if (!blocked) {
    rig.blk.Release();
    t.join();
    FAIL("the request on guest cluster A never reached host cluster H");
  }
  CHECK(img->Stats().inflight_requests >= 1);

  // Discard A and allocate B while the request is held; neither may wait for it.
  bool done = FinishesWithin(
      10000,
      [&] {
        Status s = img->Discard(kA, kCluster);
        CHECK_MESSAGE(s.ok(), s.ToString());
        std::vector<uint8_t> b(kCluster, 0x03);
        s = img->Write(kB, b.data(), kCluster);
        CHECK_MESSAGE(s.ok(), s.ToString());
      },
      [&] { rig.blk.Release(); });
  CHECK_MESSAGE(done, "Discard(A)/Write(B) waited for the held request (deadlock?)");
  if (done) {
    CHECK(rig.blk.blocked());  // still held: the race window is open
    std::vector<uint64_t> bs = ClustersFilledWith(rig.mem, 0x03);
    CHECK(bs.size() == 1);
    if (!bs.empty()) res.b_host = bs[0];
    res.b_on_h = std::find(bs.begin(), bs.end(), rig.h) != bs.end();
  }

  rig.blk.Release();
  t.join();
  CHECK_MESSAGE(held_status.ok(), held_status.ToString());
  res.held_read = rbuf;
  res.b_after = ReadGuest(img, kB, kCluster);
  res.a_after = ReadGuest(img, kA, kCluster);
  Status c = img->Close();
  CHECK_MESSAGE(c.ok(), c.ToString());
  rig.img.reset();
  res.check = QemuCheck(rig.mem);
  return res;
}

TEST_CASE("race: a held read of a discarded cluster never sees data written later") {
  testing::RequireTool("qemu-img");
  RaceResult r = RunRace(Held::kRead, /*unsafe=*/false);
  CHECK_MESSAGE(!r.b_on_h, "B was allocated at the discarded host cluster H during a read of it");
  CHECK(r.b_host != UINT64_MAX);
  bool old_or_zero = AllBytes(r.held_read, 0x01) || AllBytes(r.held_read, 0x00);
  CHECK_MESSAGE(old_or_zero, "held read returned something other than all 0x01 / all 0x00 (first byte "
                                 << int(r.held_read[0]) << ")");
  CHECK(AllBytes(r.b_after, 0x03));
  CHECK(AllBytes(r.a_after, 0x00));
  CHECK_MESSAGE(r.check.exit_code == 0, r.check.output);
}

TEST_CASE("race: a held rewrite of a discarded cluster never clobbers a new allocation") {
  testing::RequireTool("qemu-img");
  RaceResult r = RunRace(Held::kWrite, /*unsafe=*/false);
  CHECK_MESSAGE(!r.b_on_h, "B was allocated at the discarded host cluster H during a write to it");
  CHECK(r.b_host != UINT64_MAX);
  CHECK_MESSAGE(AllBytes(r.b_after, 0x03), "guest B clobbered by the stale write (first byte "
                                               << int(r.b_after[0]) << ")");
  CHECK(AllBytes(r.a_after, 0x00));
  CHECK_MESSAGE(r.check.exit_code == 0, r.check.output);
}

// With the tracked-request check disabled the scenarios must reproduce the upstream bug;
// otherwise the two tests above would prove nothing.
TEST_CASE("race: unsafe_ignore_inflight reproduces the read information leak") {
  testing::RequireTool("qemu-img");
  RaceResult r = RunRace(Held::kRead, /*unsafe=*/true);
  CHECK_MESSAGE(r.b_on_h, "without the in-flight check B should land on H (test cannot catch the bug)");
  CHECK_MESSAGE(AllBytes(r.held_read, 0x03), "without the in-flight check the held read should see B's 0x03");
}

TEST_CASE("race: unsafe_ignore_inflight reproduces the stale-write clobber") {
  testing::RequireTool("qemu-img");
  RaceResult r = RunRace(Held::kWrite, /*unsafe=*/true);
  CHECK_MESSAGE(r.b_on_h, "without the in-flight check B should land on H (test cannot catch the bug)");
  CHECK_MESSAGE(AllBytes(r.b_after, 0x02), "without the in-flight check the stale 0x02 write should clobber B");
}

// Eight threads each write their own 4K sector of one unallocated cluster at the same
// moment; the cluster must be allocated once and keep every sector.
TEST_CASE("race: overlapping allocating writes to one cluster allocate it once") {
  testing::RequireTool("qemu-img");
  constexpr int kThreads = 8;
  constexpr int kClusters = 50;
  constexpr uint64_t kSector = 4096;
  MemDevice mem;
  CreateOptions co;
  co.size = 4 << 20;  // 64 clusters
  co.cluster_bits = 16;
  REQUIRE(CreateOn(&mem, co).ok());
  auto img = OpenImage(&mem, false, "overlap");

  auto pattern = [](int c, int t) { return static_cast<uint8_t>(1 + t + kThreads * (c % 31)); };
  auto sector_of = [](int t) { return static_cast<uint64_t>(t) * 2 * kSector; };  // 0,8K,..,56K
  std::barrier sync(kThreads);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      std::vector<uint8_t> buf(kSector);
      for (int c = 0; c < kClusters; c++) {
        std::fill(buf.begin(), buf.end(), pattern(c, t));
        sync.arrive_and_wait();
        Status s = img->Write(c * kCluster + sector_of(t), buf.data(), kSector);
        if (!s.ok()) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  REQUIRE(failures.load() == 0);

  auto verify = [&](Qcow2Image* im) {
    for (int c = 0; c < kClusters; c++) {
      std::vector<uint8_t> got = ReadGuest(im, c * kCluster, kCluster);
      for (uint64_t s = 0; s < kCluster / kSector; s++) {
        uint8_t want = (s % 2 == 0) ? pattern(c, static_cast<int>(s / 2)) : 0;
        std::vector<uint8_t> sec(got.begin() + s * kSector, got.begin() + (s + 1) * kSector);
        CHECK_MESSAGE(AllBytes(sec, want), "cluster " << c << " sector " << s << ": want " << int(want)
                                                      << ", first byte " << int(sec[0]));
      }
    }
  };
  verify(img.get());
  REQUIRE(img->Close().ok());
  img.reset();
  auto reopened = OpenImage(&mem, false, "overlap");
  verify(reopened.get());
  REQUIRE(reopened->Close().ok());
  reopened.reset();

  CheckOutcome plain = QemuCheck(mem);
  CHECK_MESSAGE(plain.exit_code == 0, plain.output);
  CheckOutcome js = QemuCheck(mem, true);
  CHECK_MESSAGE(js.exit_code == 0, js.output);
  CHECK_MESSAGE(JsonInt(js.output, "allocated-clusters") == kClusters, js.output);
  CHECK_MESSAGE(JsonInt(js.output, "leaks") <= 0, js.output);
  CHECK_MESSAGE(JsonInt(js.output, "corruptions") <= 0, js.output);
}

// Four workers do fixed counts of random writes, zero-writes, discards and verifying
// reads on their own (not cluster-aligned) regions while a fifth thread flushes; the
// image must match each worker's model and stay clean.
TEST_CASE("race: concurrent random I/O on disjoint regions with concurrent flushes") {
  testing::RequireTool("qemu-img");
  constexpr int kWorkers = 4;
  constexpr int kOpsPerWorker = 15000;
  constexpr uint64_t kRegion = (3ull << 19) + 4096;  // 1.5 MiB + 4K: regions share clusters
  const uint64_t size = (kWorkers * kRegion + kCluster - 1) / kCluster * kCluster;
  MemDevice mem;
  CreateOptions co;
  co.size = size;
  co.cluster_bits = 16;
  REQUIRE(CreateOn(&mem, co).ok());
  auto img = OpenImage(&mem, false, "stress");

  std::vector<std::vector<uint8_t>> model(kWorkers, std::vector<uint8_t>(kRegion, 0));
  std::atomic<bool> stop{false};
  std::atomic<int> errors{0};
  std::atomic<int> flushes{0};
  std::vector<std::string> first_error(kWorkers);

  auto worker = [&](int w) {
    std::mt19937_64 rng(0xC0FFEE + w);
    const uint64_t base = w * kRegion;
    std::vector<uint8_t>& m = model[w];
    std::vector<uint8_t> buf;
    auto fail = [&](const std::string& what) {
      if (first_error[w].empty()) first_error[w] = what;
      errors++;
    };
    for (int op = 0; op < kOpsPerWorker && errors.load() == 0; op++) {
      uint64_t len;
      switch (rng() % 3) {
        case 0: len = 1 + rng() % 4096; break;
        case 1: len = 4096 * (1 + rng() % 16); break;
        default: len = 1 + rng() % (3 * kCluster); break;
      }
      len = std::min(len, kRegion);
      uint64_t off = rng() % (kRegion - len + 1);
      if (rng() % 2) off &= ~uint64_t{511};
      int kind = static_cast<int>(rng() % 20);
      Status s;
      if (kind < 9) {  // write
        buf.resize(len);
        for (uint64_t i = 0; i < len; i++) buf[i] = static_cast<uint8_t>((op * 7 + w * 61 + (off + i) / 512 + i) | 1);
        s = img->Write(base + off, buf.data(), len);
        if (s.ok()) std::memcpy(&m[off], buf.data(), len);
      } else if (kind < 12) {  // zero-write
        s = img->WriteZeroes(base + off, len, rng() % 2);
        if (s.ok()) std::memset(&m[off], 0, len);
      } else if (kind < 15) {  // discard (reads zeros afterwards, no backing)
        s = img->Discard(base + off, len);
        if (s.ok()) std::memset(&m[off], 0, len);
      } else {  // verifying read
        buf.assign(len, 0xEE);
        s = img->Read(base + off, buf.data(), len);
        if (s.ok() && std::memcmp(buf.data(), &m[off], len) != 0) {
          uint64_t i = 0;
          while (buf[i] == m[off + i]) i++;
          fail("worker " + std::to_string(w) + " op " + std::to_string(op) + ": read mismatch at region offset " +
               std::to_string(off + i) + " got " + std::to_string(buf[i]) + " want " + std::to_string(m[off + i]));
        }
      }
      if (!s.ok()) fail("worker " + std::to_string(w) + " op " + std::to_string(op) + ": " + s.ToString());
    }
  };
  std::thread flusher([&] {
    while (!stop.load()) {
      Status s = img->Flush();
      if (!s.ok()) {
        errors++;
        MESSAGE("flush failed: " << s.ToString());
        break;
      }
      flushes++;
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; w++) workers.emplace_back(worker, w);
  for (auto& t : workers) t.join();
  stop = true;
  flusher.join();
  for (int w = 0; w < kWorkers; w++) CHECK_MESSAGE(first_error[w].empty(), first_error[w]);
  REQUIRE(errors.load() == 0);
  MESSAGE("stress: " << kWorkers * kOpsPerWorker << " ops, " << flushes.load() << " concurrent flushes");

  auto verify = [&](Qcow2Image* im) {
    for (int w = 0; w < kWorkers; w++) {
      std::vector<uint8_t> got = ReadGuest(im, w * kRegion, kRegion);
      bool same = got == model[w];
      if (!same) {
        uint64_t i = 0;
        while (got[i] == model[w][i]) i++;
        FAIL_CHECK("region " << w << " differs at offset " << i << ": got " << int(got[i]) << " want "
                             << int(model[w][i]));
      }
    }
  };
  verify(img.get());
  REQUIRE(img->Close().ok());
  img.reset();
  auto reopened = OpenImage(&mem, false, "stress");
  verify(reopened.get());
  REQUIRE(reopened->Close().ok());
  reopened.reset();
  CheckOutcome c = QemuCheck(mem);
  CHECK_MESSAGE(c.exit_code == 0, c.output);
}

}  // namespace
}  // namespace qcowfs::qcow2
