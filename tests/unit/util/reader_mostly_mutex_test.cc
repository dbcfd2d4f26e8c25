// ReaderMostlyMutex: exclusive sections see no reader, readers run together, a stream of
// overlapping readers does not starve a writer.
#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "util/reader_mostly_mutex.h"

namespace qcowfs {
namespace {

TEST_CASE("reader-mostly mutex: a writer never overlaps a reader or another writer") {
  ReaderMostlyMutex mu;
  std::atomic<int> readers{0}, writers{0};
  std::atomic<bool> stop{false}, bad{false};
  std::atomic<uint64_t> reads{0}, writes{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < 6; i++) {
    ts.emplace_back([&] {
      while (!stop.load()) {
        mu.LockShared();
        readers.fetch_add(1);
        if (writers.load() != 0) bad = true;
        readers.fetch_sub(1);
        mu.UnlockShared();
        reads.fetch_add(1);
      }
    });
  }
  for (int i = 0; i < 2; i++) {
    ts.emplace_back([&] {
      while (!stop.load()) {
        mu.Lock();
        if (writers.fetch_add(1) != 0 || readers.load() != 0) bad = true;
        std::this_thread::yield();
        if (readers.load() != 0) bad = true;
        writers.fetch_sub(1);
        mu.Unlock();
        writes.fetch_add(1);
      }
    });
  }
  // Wait for progress on both sides (a starved writer fails this with the timeout).
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while ((writes.load() < 200 || reads.load() < 20000) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  stop = true;
  for (auto& t : ts) t.join();
  CHECK_FALSE(bad.load());
  CHECK(writes.load() >= 200);
  CHECK(reads.load() >= 20000);
}

TEST_CASE("reader-mostly mutex: readers hold it together; a writer waits for all of them") {
  ReaderMostlyMutex mu;
  std::atomic<int> inside{0};
  std::atomic<bool> release{false};
  std::vector<std::thread> rs;
  for (int i = 0; i < 4; i++) {
    rs.emplace_back([&] {
      mu.LockShared();
      inside.fetch_add(1);
      while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      mu.UnlockShared();
    });
  }
  while (inside.load() < 4) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // 4 at once
  std::atomic<bool> wrote{false};
  std::thread w([&] {
    mu.Lock();
    wrote = true;
    mu.Unlock();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(wrote.load());  // the readers still hold it
  // A new reader waits behind the writer (writers are preferred).
  std::atomic<bool> late{false};
  std::thread r([&] {
    mu.LockShared();
    late = true;
    mu.UnlockShared();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(late.load());
  release = true;
  for (auto& t : rs) t.join();
  w.join();
  r.join();
  CHECK(wrote.load());
  CHECK(late.load());
}

}  // namespace
}  // namespace qcowfs
