// The mirror job on memory devices: the sparse chunk sets, a copy of a source with data
// and holes, write-blocking writes on the target when they return, convergence against a
// slow target, and the two races a stale copy could slip through (a background copy and a
// copy-on-read that read the source before a guest write). Each race runs once with the
// ordering (claim + clear the dirty bits before the source read) switched off and must
// then see the stale data land.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "block/forwarding_device.h"
#include "mirror/chunk_set.h"
#include "mirror/mirror_filter.h"
#include "mirror/mirror_job.h"
#include "support/mem_device.h"
#include "support/slow_device.h"

namespace qcowfs::mirror {
namespace {

using testing::MemDevice;
constexpr uint64_t KiB = 1024, MiB = 1024 * KiB;

TEST_CASE("chunk set: add, remove, runs and lookups") {
  ChunkSet s;
  s.Add(10, 5);
  s.Add(15, 5);  // touching runs merge
  CHECK(s.runs() == 1);
  CHECK(s.count() == 10);
  s.Add(30, 2);
  s.Remove(12, 3);
  CHECK(s.count() == 9);
  CHECK(s.Contains(11));
  CHECK_FALSE(s.Contains(12));
  CHECK(s.Contains(15));
  CHECK(s.Intersects(0, 11));
  CHECK_FALSE(s.Intersects(20, 10));
  auto r = s.NextRun(0, 100);
  CHECK(r == std::make_pair<uint64_t, uint64_t>(10, 2));
  r = s.NextRun(16, 2);
  CHECK(r == std::make_pair<uint64_t, uint64_t>(16, 2));
  r = s.NextRun(20, 100);
  CHECK(r == std::make_pair<uint64_t, uint64_t>(30, 2));
  CHECK(s.NextRun(32, 5).second == 0);
  s.Add(0, 100);
  CHECK(s.runs() == 1);
  CHECK(s.count() == 100);
  s.Remove(0, 100);
  CHECK(s.empty());
  // A 64 TiB source at 64K chunks: a billion chunks, a few runs.
  s.Add(0, 1ull << 30);
  s.Remove(12345, 1);
  CHECK(s.runs() == 2);
}

std::vector<uint8_t> Contents(block::BlockDevice* d, uint64_t off, uint64_t len) {
  std::vector<uint8_t> b(len);
  REQUIRE(d->Read(off, b.data(), len).ok());
  return b;
}

// A source device whose armed read (or write) completes on the lower device and then
// waits for Release(): the caller holds data read before anything that happens meanwhile
// (or a guest write is done on the source but not yet past the filter). ArmStatus does
// the same for the next block-status query.
class ReadThenHold final : public block::ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  void Arm(uint64_t off, bool write = false) {
    std::lock_guard<std::mutex> l(mu_);
    armed_ = true;
    write_ = write;
    off_ = off;
  }
  void ArmStatus() {
    std::lock_guard<std::mutex> l(mu_);
    status_armed_ = true;
  }
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    auto r = lower()->GetBlockStatus(offset, len);
    std::unique_lock<std::mutex> l(mu_);
    if (status_armed_) {
      status_armed_ = false;
      held_ = true;
      cv_.notify_all();
      cv_.wait(l, [&] { return released_; });
    }
    return r;
  }
  bool WaitHeld() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(10), [&] { return held_; });
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu_);
    released_ = true;
    cv_.notify_all();
  }
  Status Read(uint64_t offset, void* buf, size_t len) override {
    Status s = lower()->Read(offset, buf, len);
    MaybeHold(false, offset, len);
    return s;
  }
  Status Write(uint64_t offset, const void* buf, size_t len) override {
    Status s = lower()->Write(offset, buf, len);
    MaybeHold(true, offset, len);
    return s;
  }

 private:
  void MaybeHold(bool write, uint64_t offset, uint64_t len) {
    std::unique_lock<std::mutex> l(mu_);
    if (armed_ && write_ == write && offset <= off_ && off_ < offset + len) {
      armed_ = false;
      held_ = true;
      cv_.notify_all();
      cv_.wait(l, [&] { return released_; });
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  bool armed_ = false, write_ = false, status_armed_ = false, held_ = false, released_ = false;
  uint64_t off_ = 0;
};

struct Rig {
  explicit Rig(uint64_t size) : src(size), hold(&src), filter(&hold), dst(size) {
    std::vector<uint8_t> a(size);
    for (uint64_t i = 0; i < size; i++) a[i] = static_cast<uint8_t>(i / 4096 + 1);
    REQUIRE(src.Write(0, a.data(), size).ok());
  }
  std::unique_ptr<MirrorJob> Job(config::MirrorJobConfig::Mode mode, bool cor, uint64_t speed) {
    config::MirrorJobConfig c;
    c.id = "t";
    c.mode = mode;
    c.copy_on_read = cor;
    c.buf_size = 1 * MiB;
    c.speed = speed;
    Target t;
    if (target_rate > 0) {
      auto slow = std::make_unique<testing::SlowDevice>(&dst, target_rate);
      slow_target = slow.get();
      t.dev = std::move(slow);
    } else {
      t.dev = std::make_unique<block::ForwardingDevice>(&dst);
    }
    t.known_zero = true;
    t.desc = "mem";
    return std::make_unique<MirrorJob>(c, 64 * KiB, "img", &filter, &hold, std::move(t));
  }
  MemDevice src;
  ReadThenHold hold;
  MirrorFilter filter;
  MemDevice dst;
  uint64_t target_rate = 0;  // > 0: the target is a SlowDevice writing this many bytes/s
  testing::SlowDevice* slow_target = nullptr;
};

TEST_CASE("mirror job: background copy of data and holes, then guest writes; complete without pivot") {
  Rig r(4 * MiB);
  REQUIRE(r.src.WriteZeroes(1 * MiB, 1 * MiB, true).ok());  // a hole in the middle
  auto job = r.Job(config::MirrorJobConfig::Mode::kBackground, false, 0);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  std::vector<uint8_t> b(5000, 0x77);
  REQUIRE(r.filter.Write(65536 - 100, b.data(), b.size()).ok());
  REQUIRE(r.filter.WriteZeroes(3 * MiB, 64 * KiB, true).ok());
  REQUIRE(job->Complete(false).ok());
  CHECK(job->state() == JobState::kCompleted);
  CHECK(Contents(&r.dst, 0, 4 * MiB) == Contents(&r.src, 0, 4 * MiB));
  CHECK_FALSE(r.filter.has_job());
  CHECK(r.filter.lower() == &r.hold);
}

TEST_CASE("mirror job: write-blocking writes are on the target when they return") {
  Rig r(2 * MiB);
  auto job = r.Job(config::MirrorJobConfig::Mode::kWriteBlocking, false, 0);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; i++) {
    uint64_t off = rng() % (2 * MiB - 1), len = 1 + rng() % std::min<uint64_t>(200 * KiB, 2 * MiB - off);
    if (i % 5 == 0) {
      REQUIRE(r.filter.WriteZeroes(off, len, i % 2 == 0).ok());
    } else {
      std::vector<uint8_t> b(len, static_cast<uint8_t>(i));
      REQUIRE(r.filter.Write(off, b.data(), len).ok());
    }
    REQUIRE_MESSAGE(Contents(&r.dst, off, len) == Contents(&r.src, off, len), "op " << i << " at " << off << "+" << len);
  }
  CHECK(job->Report().actively_synced);
  job->Cancel();
  CHECK(job->state() == JobState::kCancelled);
}

// A copy (background, or copy-on-read) read chunk 48 before a guest write to it; once
// released, the target must end with the new data.
void StaleCopyRace(bool cor, bool unsafe) {
  Rig r(4 * MiB);
  const uint64_t at = 3 * MiB;
  r.hold.Arm(at);
  // Copy-on-read: the background copy takes its first 1 MiB and then has to wait (speed
  // 1 byte/s), so the read of chunk 48 is the copy-on-read's.
  auto job = r.Job(config::MirrorJobConfig::Mode::kBackground, cor, cor ? 1 : 0);
  job->set_unsafe_clear_after_read(unsafe);
  job->Start();
  std::thread reader;
  std::vector<uint8_t> got(64 * KiB);
  if (cor) {
    // The scan must have marked chunk 48 dirty, and the one copy worker must have done its
    // first operation (it then waits for the speed budget): otherwise the read is a plain
    // read (nothing dirty yet, or buf_size taken by the copy in flight).
    auto settled = [&] {
      auto rep = job->Report();
      return rep.bytes_total == 4 * MiB && rep.bytes_done > 0;
    };
    for (int i = 0; i < 4000 && !settled(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    REQUIRE(settled());
    reader = std::thread([&] { REQUIRE(r.filter.Read(at, got.data(), got.size()).ok()); });
  }
  REQUIRE(r.hold.WaitHeld());
  std::vector<uint8_t> b(4 * KiB, 0xee);
  REQUIRE(r.filter.Write(at + 8 * KiB, b.data(), b.size()).ok());  // completes: the copy holds old data
  r.hold.Release();
  if (reader.joinable()) reader.join();
  job->SetSpeed(0);
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  bool same = Contents(&r.dst, at, 64 * KiB) == Contents(&r.src, at, 64 * KiB);
  if (unsafe) {
    CHECK_MESSAGE(!same, "with the ordering off the stale copy should land (the test would not catch it)");
  } else {
    CHECK(same);
    REQUIRE(job->Complete(false).ok());
    CHECK(Contents(&r.dst, 0, 4 * MiB) == Contents(&r.src, 0, 4 * MiB));
  }
  job->Cancel();
}

TEST_CASE("mirror race: a background copy that read before a guest write is redone") {
  SUBCASE("ordered") { StaleCopyRace(false, false); }
  SUBCASE("ordering off: the stale copy lands") { StaleCopyRace(false, true); }
}

TEST_CASE("mirror race: a copy-on-read that read before a guest write is redone") {
  SUBCASE("ordered") { StaleCopyRace(true, false); }
  SUBCASE("ordering off: the stale copy lands") { StaleCopyRace(true, true); }
}

// Two overlapping write-blocking guest writes: A is done on the source first, then B (so
// the source holds B), but A reaches the job only after B went through to the target. The
// target must end with B, like the source: a guest write claims its range before its
// source write, so B waits for A there. (Claimed only after the source write, B would go
// through first and A's older bytes would land on the target over it, in a chunk the job
// believes clean.)
TEST_CASE("mirror race: overlapping write-blocking writes reach the target in their source order") {
  Rig r(1 * MiB);
  auto job = r.Job(config::MirrorJobConfig::Mode::kWriteBlocking, false, 0);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  const uint64_t at = 256 * KiB + 100;
  std::vector<uint8_t> a(8 * KiB, 0xa1), b(8 * KiB, 0xb2);
  r.hold.Arm(at, true);
  std::thread wa([&] { CHECK(r.filter.Write(at, a.data(), a.size()).ok()); });
  REQUIRE(r.hold.WaitHeld());  // A is on the source
  std::atomic<bool> b_done{false};
  std::thread wb([&] {
    CHECK(r.filter.Write(at + 4 * KiB, b.data(), b.size()).ok());
    b_done = true;
  });
  // B may finish on its own (the unsafe order) or wait for A (the safe one); give it time.
  for (int i = 0; i < 100 && !b_done; i++) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  r.hold.Release();
  wa.join();
  wb.join();
  CHECK(Contents(&r.src, at + 4 * KiB, 4 * KiB) == std::vector<uint8_t>(4 * KiB, 0xb2));
  CHECK(Contents(&r.dst, 0, 1 * MiB) == Contents(&r.src, 0, 1 * MiB));
  REQUIRE(job->Complete(false).ok());
  CHECK(Contents(&r.dst, 0, 1 * MiB) == Contents(&r.src, 0, 1 * MiB));
}

// Guest writes through the filter from threads until stopped: random 4K..64K writes in
// [0, size).
class FilterWriters {
 public:
  FilterWriters(MirrorFilter* f, uint64_t size, int threads) {
    for (int t = 0; t < threads; t++)
      threads_.emplace_back([this, f, size, t] {
        std::mt19937_64 rng(100 + t);
        std::vector<uint8_t> b(64 * KiB);
        while (!stop_) {
          uint64_t len = 4 * KiB * (1 + rng() % 16), off = (rng() % (size - len)) & ~4095ull;
          std::fill(b.begin(), b.end(), static_cast<uint8_t>(rng()));
          if (!f->Write(off, b.data(), len).ok()) failures_++;
          writes_++;
          // Still far faster than the target; leaves CPU to the job under the sanitizers.
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
      });
  }
  ~FilterWriters() { Stop(); }
  bool Stop() {
    stop_ = true;
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    return failures_ == 0;
  }
  int writes() const { return writes_; }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> writes_{0}, failures_{0};
  std::vector<std::thread> threads_;
};

// Convergence against a target slower than the guest (8 MiB/s; eight writers on memory are
// far faster). Write-blocking: once the scan has marked everything, the dirty count never
// grows whatever the guest writes (writes into copied chunks go through, writes into dirty
// chunks add nothing), so the job becomes ready while the writers keep writing (with eight
// of them some guest write is always in flight: ready must not wait for none). Background:
// the same writers re-dirty chunks faster than the copy cleans them; no ready until they stop.
TEST_CASE("mirror job: write-blocking converges under writers faster than a slow target; background does not") {
  for (auto mode : {config::MirrorJobConfig::Mode::kWriteBlocking, config::MirrorJobConfig::Mode::kBackground}) {
    const bool blocking = mode == config::MirrorJobConfig::Mode::kWriteBlocking;
    INFO((blocking ? "write-blocking" : "background"));
    Rig r(4 * MiB);
    r.target_rate = 8 * MiB;
    auto job = r.Job(mode, false, 0);
    FilterWriters w(&r.filter, 4 * MiB, 8);
    job->Start();
    // The scan is done once every chunk was counted (a known-zero target, all data).
    auto scanned = [&] { return job->Report().bytes_total >= 4 * MiB; };
    for (int i = 0; i < 4000 && !scanned(); i++) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    REQUIRE(scanned());
    uint64_t dirty = job->Report().dirty_bytes, max_growth = 0;
    JobState st = JobState::kRunning;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(blocking ? 60 : 2);
    while (std::chrono::steady_clock::now() < until) {
      auto rep = job->Report();
      if (rep.dirty_bytes > dirty) max_growth = std::max(max_growth, rep.dirty_bytes - dirty);
      dirty = rep.dirty_bytes;
      st = job->state();
      if (st != JobState::kRunning) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (blocking) {
      CHECK(max_growth == 0);
      REQUIRE(st == JobState::kReady);
      int at_ready = w.writes();
      for (int i = 0; i < 4000 && w.writes() < at_ready + 50; i++) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      CHECK(w.writes() >= at_ready + 50);  // the writers went on and the job stays ready
      CHECK(job->state() == JobState::kReady);
      CHECK(job->Report().actively_synced);
    } else {
      CHECK(max_growth > 0);
      CHECK(st == JobState::kRunning);
    }
    REQUIRE(w.Stop());
    REQUIRE(job->WaitReadyOrEnd(60000) == JobState::kReady);
    REQUIRE(job->Complete(false).ok());
    CHECK(Contents(&r.dst, 0, 4 * MiB) == Contents(&r.src, 0, 4 * MiB));
  }
}

TEST_CASE("mirror job: a target error fails the job, never the guest") {
  class FailingTarget final : public block::ForwardingDevice {
   public:
    using ForwardingDevice::ForwardingDevice;
    std::atomic<bool> fail{false};
    Status Write(uint64_t o, const void* b, size_t l) override {
      return fail ? Status::IoError("injected target error") : lower()->Write(o, b, l);
    }
  };
  MemDevice src(1 * MiB), dst(1 * MiB);
  std::vector<uint8_t> a(1 * MiB, 0x31);
  REQUIRE(src.Write(0, a.data(), a.size()).ok());
  MirrorFilter filter(&src);
  auto ft = std::make_unique<FailingTarget>(&dst);
  FailingTarget* f = ft.get();
  config::MirrorJobConfig c;
  c.id = "f";
  c.mode = config::MirrorJobConfig::Mode::kWriteBlocking;
  Target t;
  t.dev = std::move(ft);
  t.desc = "mem";
  MirrorJob job(c, 64 * KiB, "img", &filter, &src, std::move(t));
  job.Start();
  REQUIRE(job.WaitReadyOrEnd(20000) == JobState::kReady);
  f->fail = true;
  std::vector<uint8_t> b(4096, 0x44);
  CHECK(filter.Write(4096, b.data(), b.size()).ok());  // the guest gets the source's result
  CHECK(job.state() == JobState::kFailed);
  CHECK(job.Report().error.find("injected target error") != std::string::npos);
  CHECK(Contents(&src, 4096, 4096) == b);
  CHECK_FALSE(job.Complete(true).ok());
  job.Cancel();
  CHECK(job.state() == JobState::kFailed);
  CHECK_FALSE(filter.has_job());
}


// Counts the target requests of each kind.
class CountingTarget final : public block::ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  std::atomic<int> writes{0}, zeroes{0}, writebacks{0};
  Status Write(uint64_t o, const void* b, size_t l) override {
    writes++;
    return lower()->Write(o, b, l);
  }
  void StartWriteback() override {
    writebacks++;
    lower()->StartWriteback();
  }
  Status WriteZeroes(uint64_t o, uint64_t l, bool unmap) override {
    zeroes++;
    return lower()->WriteZeroes(o, l, unmap);
  }
};

// A target that is not known to read zeros (it holds 0xff everywhere), so every zero
// range of the source must be written as zeros.
std::unique_ptr<MirrorJob> JobOntoOldTarget(MirrorFilter* filter, block::BlockDevice* src, MemDevice* dst,
                                            CountingTarget** counter, config::MirrorJobConfig::Mode mode,
                                            uint64_t buf_size = 16 * MiB) {
  std::vector<uint8_t> ff(dst->Size(), 0xff);
  REQUIRE(dst->Write(0, ff.data(), ff.size()).ok());
  config::MirrorJobConfig c;
  c.id = "z";
  c.mode = mode;
  c.buf_size = buf_size;
  auto ct = std::make_unique<CountingTarget>(dst);
  *counter = ct.get();
  Target t;
  t.dev = std::move(ct);
  t.desc = "mem";
  return std::make_unique<MirrorJob>(c, 64 * KiB, "img", filter, src, std::move(t));
}

TEST_CASE("mirror job: a long zero range goes out as one write-zeroes, not one per chunk or MiB") {
  MemDevice src(64 * MiB), dst(64 * MiB);
  std::vector<uint8_t> a(1 * MiB, 0x31);
  REQUIRE(src.Write(0, a.data(), a.size()).ok());
  REQUIRE(src.Write(60 * MiB, a.data(), a.size()).ok());
  MirrorFilter filter(&src);
  CountingTarget* ct = nullptr;
  // One worker (buf_size 1 MiB), so no other worker's claim splits a run.
  auto job = JobOntoOldTarget(&filter, &src, &dst, &ct, config::MirrorJobConfig::Mode::kBackground, 1 * MiB);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  // Two zero runs ([1M, 60M) and [61M, 64M)), and the first data operation ends with
  // zeros: a few write-zeroes, never one per 1 MiB operation (62).
  CHECK(ct->zeroes.load() <= 4);
  job->Cancel();
  CHECK(Contents(&dst, 0, 64 * MiB) == Contents(&src, 0, 64 * MiB));
}

// The flush before ready should not have the whole copy to write: the job starts the
// target's writeback every 8 MiB of data.
TEST_CASE("mirror job: the target's writeback is started while the copy goes on") {
  MemDevice src(64 * MiB), dst(64 * MiB);
  std::vector<uint8_t> a(40 * MiB, 0x5a);
  REQUIRE(src.Write(0, a.data(), a.size()).ok());
  MirrorFilter filter(&src);
  CountingTarget* ct = nullptr;
  auto job = JobOntoOldTarget(&filter, &src, &dst, &ct, config::MirrorJobConfig::Mode::kBackground);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  // 40 MiB of data: 5 kicks (a few more or less if workers race on the counter).
  CHECK(ct->writebacks.load() >= 3);
  CHECK(ct->writebacks.load() <= 6);
  job->Cancel();
  CHECK(Contents(&dst, 0, 64 * MiB) == Contents(&src, 0, 64 * MiB));
}

TEST_CASE("mirror job: a guest write after the zero run was looked at, before it was claimed, is copied") {
  // One worker (buf_size 1 MiB). Once ready, the guest zeroes [1M, 9M): the worker picks
  // 1 MiB of it, looks at the source there (zeros to the end) and is held; the guest
  // writes at 8M - 4K; released, the worker claims the rest up to 9M in one piece. It must
  // look at the source again, not write the zeros it saw.
  MemDevice src(32 * MiB), dst(32 * MiB);
  std::vector<uint8_t> a(64 * KiB, 0x31);
  REQUIRE(src.Write(0, a.data(), a.size()).ok());
  ReadThenHold hold(&src);
  MirrorFilter filter(&hold);
  CountingTarget* ct = nullptr;
  auto job = JobOntoOldTarget(&filter, &hold, &dst, &ct, config::MirrorJobConfig::Mode::kBackground, 1 * MiB);
  job->Start();
  REQUIRE(job->WaitReadyOrEnd(20000) == JobState::kReady);
  hold.ArmStatus();
  REQUIRE(filter.WriteZeroes(1 * MiB, 8 * MiB, true).ok());
  REQUIRE(hold.WaitHeld());
  std::vector<uint8_t> b(4096, 0x5e);
  REQUIRE(filter.Write(8 * MiB - 4096, b.data(), b.size()).ok());
  hold.Release();
  REQUIRE(job->Complete(false).ok());
  CHECK(Contents(&dst, 8 * MiB - 4096, 4096) == b);
  CHECK(Contents(&dst, 0, 32 * MiB) == Contents(&src, 0, 32 * MiB));
}

TEST_CASE("mirror job: guest writes into a zero range being claimed in one piece are never lost") {
  for (auto mode : {config::MirrorJobConfig::Mode::kBackground, config::MirrorJobConfig::Mode::kWriteBlocking}) {
    for (int round = 0; round < 10; round++) {
      CAPTURE(round);
      MemDevice src(32 * MiB), dst(32 * MiB);
      MirrorFilter filter(&src);
      CountingTarget* ct = nullptr;
      auto job = JobOntoOldTarget(&filter, &src, &dst, &ct, mode);
      std::atomic<bool> stop{false};
      std::thread w([&] {
        std::mt19937_64 rng(round);
        std::vector<uint8_t> b(8 * KiB);
        while (!stop.load()) {
          uint64_t off = (rng() % (32 * MiB - b.size())) & ~511ull;
          std::fill(b.begin(), b.end(), static_cast<uint8_t>(rng() | 1));
          REQUIRE(filter.Write(off, b.data(), b.size()).ok());
        }
      });
      job->Start();
      JobState st = job->WaitReadyOrEnd(20000);
      stop = true;
      w.join();
      REQUIRE(st == JobState::kReady);
      REQUIRE(job->Complete(false).ok());
      CHECK(Contents(&dst, 0, 32 * MiB) == Contents(&src, 0, 32 * MiB));
    }
  }
}

}  // namespace
}  // namespace qcowfs::mirror
