// TableCache: LRU victim selection, recency refresh, counters, capacity.
#include <doctest/doctest.h>

#include <algorithm>
#include <vector>

#include "qcow2/table_cache.h"

namespace qcowfs::qcow2 {
namespace {

std::vector<uint8_t> Table(uint8_t fill) { return std::vector<uint8_t>(512, fill); }

TEST_CASE("table cache: insert and find") {
  TableCache c(4, 512);
  CHECK(c.size() == 0);
  CHECK(c.table_size() == 512);
  CHECK(c.Victim() == nullptr);
  CHECK(c.Find(4096) == nullptr);
  auto* e = c.Insert(4096, Table(7));
  REQUIRE(e != nullptr);
  CHECK(e->offset == 4096);
  CHECK_FALSE(e->dirty);
  CHECK(e->data.size() == 512);
  CHECK(e->data[0] == 7);
  CHECK(c.Find(4096) == e);
  CHECK(c.Find(8192) == nullptr);
  CHECK(c.size() == 1);
  // Entry pointers stay valid while other entries come and go.
  c.Insert(8192, Table(8));
  c.Insert(12288, Table(9));
  c.Erase(8192);
  CHECK(c.Find(4096) == e);
  CHECK(c.Find(4096)->data[0] == 7);
  CHECK(c.Find(8192) == nullptr);
  CHECK(c.size() == 2);
  c.Clear();
  CHECK(c.size() == 0);
  CHECK(c.Find(4096) == nullptr);
}

TEST_CASE("table cache: victim is the least recently used") {
  TableCache c(3, 512);
  c.Insert(1 * 512, Table(1));
  c.Insert(2 * 512, Table(2));
  c.Insert(3 * 512, Table(3));
  REQUIRE(c.Victim() != nullptr);
  CHECK(c.Victim()->offset == 1 * 512);  // oldest insert
  // Victim() itself must not count as a use.
  CHECK(c.Victim()->offset == 1 * 512);
  c.Find(1 * 512);  // refresh: now 2 is the oldest
  CHECK(c.Victim()->offset == 2 * 512);
  c.Find(2 * 512);
  CHECK(c.Victim()->offset == 3 * 512);
  c.Find(3 * 512);
  c.Find(1 * 512);
  CHECK(c.Victim()->offset == 2 * 512);
  // Evict as the engine does: erase the victim, insert the new table.
  c.Erase(c.Victim()->offset);
  c.Insert(4 * 512, Table(4));
  CHECK(c.Find(2 * 512) == nullptr);
  CHECK(c.Victim()->offset == 3 * 512);
  // A failed Find does not disturb the order.
  CHECK(c.Find(99 * 512) == nullptr);
  CHECK(c.Victim()->offset == 3 * 512);
}

TEST_CASE("table cache: LRU order over many accesses matches a model") {
  TableCache c(8, 512);
  std::vector<uint64_t> order;  // front = least recent
  for (uint64_t i = 0; i < 8; i++) {
    c.Insert(i * 512, Table(static_cast<uint8_t>(i)));
    order.push_back(i * 512);
  }
  uint64_t x = 12345;
  for (int n = 0; n < 500; n++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    uint64_t off = order[(x >> 33) % order.size()];
    REQUIRE(c.Find(off) != nullptr);
    order.erase(std::find(order.begin(), order.end(), off));
    order.push_back(off);
    REQUIRE(c.Victim()->offset == order.front());
  }
}

TEST_CASE("table cache: hit and miss counters, full()") {
  TableCache c(2, 512);
  CHECK(c.hits() == 0);
  CHECK(c.misses() == 0);
  CHECK_FALSE(c.full());
  c.Insert(0x1000, Table(0));
  CHECK(c.misses() == 1);
  CHECK_FALSE(c.full());
  c.Insert(0x2000, Table(0));
  CHECK(c.misses() == 2);
  CHECK(c.full());
  c.Find(0x1000);
  c.Find(0x2000);
  c.Find(0x1000);
  CHECK(c.hits() == 3);
  c.Find(0x3000);  // absent: not a hit
  CHECK(c.hits() == 3);
  c.Erase(0x1000);
  CHECK_FALSE(c.full());
  // Capacity is at least 2 even if asked for less.
  TableCache tiny(0, 512);
  tiny.Insert(0, Table(0));
  CHECK_FALSE(tiny.full());
  tiny.Insert(512, Table(0));
  CHECK(tiny.full());
}

TEST_CASE("table cache: ForEach visits every entry, dirty flag is per entry") {
  TableCache c(4, 512);
  c.Insert(0, Table(0))->dirty = true;
  c.Insert(512, Table(1));
  c.Insert(1024, Table(2))->dirty = true;
  int n = 0, dirty = 0;
  uint64_t sum = 0;
  c.ForEach([&](TableCache::Entry* e) {
    n++;
    dirty += e->dirty;
    sum += e->offset;
  });
  CHECK(n == 3);
  CHECK(dirty == 2);
  CHECK(sum == 1536);
  CHECK_FALSE(c.Find(512)->dirty);
}

}  // namespace
}  // namespace qcowfs::qcow2
