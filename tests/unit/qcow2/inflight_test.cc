// Tracked requests: InFlightTable and HostRangeSet (SPEC §5).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "qcow2/inflight.h"

namespace qcowfs::qcow2 {
namespace {

TEST_CASE("inflight: register, overlap edges, release") {
  InFlightTable t;
  CHECK(t.size() == 0);
  CHECK_FALSE(t.Overlaps(0, ~0ull >> 1));
  auto h = t.Register(100, 100);  // [100, 200)
  CHECK(t.size() == 1);
  CHECK(t.Overlaps(100, 100));
  CHECK(t.Overlaps(150, 1));
  CHECK(t.Overlaps(199, 1));
  CHECK(t.Overlaps(0, 101));
  CHECK(t.Overlaps(199, 1000));
  CHECK(t.Overlaps(0, 1000));  // containing
  CHECK_FALSE(t.Overlaps(200, 10));  // adjacent after
  CHECK_FALSE(t.Overlaps(90, 10));   // adjacent before
  CHECK_FALSE(t.Overlaps(0, 100));
  CHECK_FALSE(t.Overlaps(1000, 5));
  t.Release(h);
  CHECK(t.size() == 0);
  CHECK_FALSE(t.Overlaps(100, 100));
}

TEST_CASE("inflight: duplicate ranges are counted separately") {
  InFlightTable t;
  auto a = t.Register(4096, 4096);
  auto b = t.Register(4096, 4096);
  auto c = t.Register(65536, 512);
  CHECK(t.size() == 3);
  t.Release(a);
  CHECK(t.Overlaps(4096, 1));  // b still holds it
  t.Release(b);
  CHECK_FALSE(t.Overlaps(4096, 4096));
  CHECK(t.Overlaps(65536 + 511, 1));
  t.Release(c);
  CHECK(t.size() == 0);
}

TEST_CASE("inflight: releasing one handle keeps the others valid") {
  InFlightTable t;
  std::vector<InFlightTable::Handle> hs;
  for (uint64_t i = 0; i < 10; i++) hs.push_back(t.Register(i * 1000, 10));
  t.Release(hs[5]);
  t.Release(hs[0]);
  t.Release(hs[9]);
  CHECK(t.size() == 7);
  for (uint64_t i = 0; i < 10; i++) CHECK(t.Overlaps(i * 1000 + 5, 1) == (i != 0 && i != 5 && i != 9));
  auto snap = t.Snapshot();
  CHECK(snap.size() == 7);
  std::sort(snap.begin(), snap.end(), [](const HostRange& a, const HostRange& b) { return a.start < b.start; });
  CHECK(snap.front().start == 1000);
  CHECK(snap.front().end == 1010);
  CHECK(snap.back().start == 8000);
  for (uint64_t i : {1, 2, 3, 4, 6, 7, 8}) t.Release(hs[i]);
  CHECK(t.size() == 0);
  CHECK(t.Snapshot().empty());
}

TEST_CASE("host range set: merge and overlap") {
  HostRangeSet empty({});
  CHECK(empty.empty());
  CHECK_FALSE(empty.Overlaps(0, ~0ull >> 1));

  // Unsorted input with adjacent, overlapping, nested and separate ranges.
  HostRangeSet s({{300, 400}, {0, 10}, {10, 20}, {500, 600}, {15, 18}, {350, 450}, {1000, 1001}});
  CHECK_FALSE(s.empty());
  CHECK(s.Overlaps(0, 1));
  CHECK(s.Overlaps(19, 1));
  CHECK(s.Overlaps(9, 2));  // across the merge point
  CHECK_FALSE(s.Overlaps(20, 280));  // exactly the gap [20, 300)
  CHECK(s.Overlaps(20, 281));
  CHECK(s.Overlaps(449, 1));
  CHECK_FALSE(s.Overlaps(450, 50));  // gap [450, 500)
  CHECK(s.Overlaps(450, 51));
  CHECK(s.Overlaps(599, 1));
  CHECK_FALSE(s.Overlaps(600, 400));
  CHECK(s.Overlaps(1000, 1));
  CHECK_FALSE(s.Overlaps(1001, 100));
  CHECK(s.Overlaps(0, 5000));  // spanning everything
  CHECK(s.Overlaps(21, 1000));  // starts in a gap, reaches a range

  // A nested range must not shrink the one containing it.
  HostRangeSet n({{0, 100}, {10, 20}, {30, 40}});
  CHECK(n.Overlaps(50, 1));
  CHECK(n.Overlaps(99, 1));
  CHECK_FALSE(n.Overlaps(100, 1));
}

TEST_CASE("host range set: matches brute force on random ranges") {
  uint64_t x = 42;
  auto next = [&] {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    return x >> 33;
  };
  for (int round = 0; round < 50; round++) {
    std::vector<HostRange> rs;
    int n = static_cast<int>(next() % 20);
    for (int i = 0; i < n; i++) {
      uint64_t s = next() % 2000;
      rs.push_back({s, s + 1 + next() % 100});
    }
    HostRangeSet set(rs);
    for (int q = 0; q < 200; q++) {
      uint64_t s = next() % 2200;
      uint64_t len = 1 + next() % 150;
      bool want = false;
      for (const auto& r : rs) want |= r.start < s + len && s < r.end;
      REQUIRE(set.Overlaps(s, len) == want);
    }
  }
}

TEST_CASE("inflight: concurrent register/release from 4 threads") {
  InFlightTable t;
  std::atomic<int> errors{0};
  std::vector<std::thread> ts;
  for (int id = 0; id < 4; id++) {
    ts.emplace_back([&, id] {
      const uint64_t base = static_cast<uint64_t>(id) << 32;
      for (int i = 0; i < 20000; i++) {
        uint64_t off = base + (i % 64) * 4096;
        auto h = t.Register(off, 4096);
        auto h2 = t.Register(off + 1'000'000, 512);
        if (!t.Overlaps(off + 100, 1)) errors++;
        if (i % 100 == 0) (void)t.Snapshot();
        t.Release(h);
        t.Release(h2);
      }
    });
  }
  for (auto& th : ts) th.join();
  CHECK(errors.load() == 0);
  CHECK(t.size() == 0);
  CHECK_FALSE(t.Overlaps(0, ~0ull >> 1));
}

}  // namespace
}  // namespace qcowfs::qcow2
