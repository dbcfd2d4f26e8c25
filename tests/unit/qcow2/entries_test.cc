// Refcount entry packing for every refcount_order, and Geometry::Make.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <vector>

#include "qcow2/format.h"

namespace qcowfs::qcow2 {
namespace {

constexpr size_t kBlock = 4096;

uint64_t MaxFor(uint32_t order) {
  uint32_t bits = 1u << order;
  return bits == 64 ? ~0ull : (1ull << bits) - 1;
}

TEST_CASE("refcounts: every order stores distinct values independently") {
  for (uint32_t order = 0; order <= 6; order++) {
    INFO("order " << order);
    const uint64_t entries = kBlock * 8 / (1u << order);
    const uint64_t max = MaxFor(order);
    std::vector<uint8_t> block(kBlock, 0);
    std::vector<uint64_t> model(entries, 0);
    std::mt19937_64 rng(1234 + order);
    // Random writes in random order, checking neighbours after each.
    for (int n = 0; n < 3000; n++) {
      uint64_t i = rng() % entries;
      uint64_t v = rng() & max;
      if (n % 7 == 0) v = max;
      if (n % 11 == 0) v = 0;
      SetRefcount(block.data(), i, order, v);
      model[i] = v;
      REQUIRE(GetRefcount(block.data(), i, order) == v);
      if (i > 0) REQUIRE(GetRefcount(block.data(), i - 1, order) == model[i - 1]);
      if (i + 1 < entries) REQUIRE(GetRefcount(block.data(), i + 1, order) == model[i + 1]);
    }
    for (uint64_t i = 0; i < entries; i++) {
      if (GetRefcount(block.data(), i, order) != model[i]) {
        FAIL("index " << i << " reads " << GetRefcount(block.data(), i, order) << " want "
                      << model[i]);
      }
    }
    // Every index, sequentially, with an index-derived value.
    for (uint64_t i = 0; i < entries; i++) SetRefcount(block.data(), i, order, (i * 2654435761u) & max);
    for (uint64_t i = 0; i < entries; i++)
      REQUIRE(GetRefcount(block.data(), i, order) == ((i * 2654435761u) & max));
    // The last entry of the block does not touch anything past it.
    std::vector<uint8_t> big(kBlock + 8, 0xcc);
    SetRefcount(big.data(), entries - 1, order, max);
    CHECK(GetRefcount(big.data(), entries - 1, order) == max);
    for (size_t b = kBlock; b < kBlock + 8; b++) CHECK(big[b] == 0xcc);
  }
}

TEST_CASE("refcounts: max value round-trips and clearing leaves neighbours") {
  for (uint32_t order = 0; order <= 6; order++) {
    INFO("order " << order);
    const uint64_t max = MaxFor(order);
    std::vector<uint8_t> block(kBlock, 0xff);  // all entries at max
    const uint64_t entries = kBlock * 8 / (1u << order);
    std::vector<uint64_t> model(entries, max);
    for (uint64_t i : {0ull, 1ull, 2ull, 7ull, 8ull, 63ull, 100ull}) {
      SetRefcount(block.data(), i, order, max);
      CHECK(GetRefcount(block.data(), i, order) == max);
      SetRefcount(block.data(), i, order, 0);
      model[i] = 0;
      CHECK(GetRefcount(block.data(), i, order) == 0);
      if (i > 0) CHECK(GetRefcount(block.data(), i - 1, order) == model[i - 1]);
      CHECK(GetRefcount(block.data(), i + 1, order) == model[i + 1]);
    }
    for (uint64_t i = 0; i < entries; i++) REQUIRE(GetRefcount(block.data(), i, order) == model[i]);
  }
  std::vector<uint8_t> b(64, 0);
  SetRefcount(b.data(), 3, 6, 0xfedcba9876543210ull);
  CHECK(GetRefcount(b.data(), 3, 6) == 0xfedcba9876543210ull);
  SetRefcount(b.data(), 3, 5, 0xdeadbeef);
  CHECK(GetRefcount(b.data(), 3, 5) == 0xdeadbeefu);
}

TEST_CASE("refcounts: on-disk byte layout") {
  std::vector<uint8_t> b(16, 0);
  // order 0: 1-bit, LSB first.
  SetRefcount(b.data(), 0, 0, 1);
  CHECK(b[0] == 0x01);
  SetRefcount(b.data(), 7, 0, 1);
  CHECK(b[0] == 0x81);
  SetRefcount(b.data(), 0, 0, 0);
  CHECK(b[0] == 0x80);
  SetRefcount(b.data(), 8, 0, 1);
  CHECK(b[1] == 0x01);
  SetRefcount(b.data(), 15, 0, 1);
  CHECK(b[1] == 0x81);
  // order 1: 2-bit.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 0, 1, 3);
  CHECK(b[0] == 0x03);
  SetRefcount(b.data(), 3, 1, 1);
  CHECK(b[0] == 0x43);
  SetRefcount(b.data(), 4, 1, 2);
  CHECK(b[1] == 0x02);
  // order 2: 4-bit nibbles, low nibble first.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 1, 2, 0xa);
  CHECK(b[0] == 0xa0);
  SetRefcount(b.data(), 0, 2, 0x5);
  CHECK(b[0] == 0xa5);
  CHECK(GetRefcount(b.data(), 0, 2) == 5);
  CHECK(GetRefcount(b.data(), 1, 2) == 0xa);
  // order 3: one byte each.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 5, 3, 0xab);
  CHECK(b[5] == 0xab);
  // order 4: big-endian 16-bit.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 1, 4, 0x1234);
  CHECK(b[2] == 0x12);
  CHECK(b[3] == 0x34);
  CHECK(b[0] == 0);
  CHECK(b[4] == 0);
  b[0] = 0x00;
  b[1] = 0x01;  // qemu's usual refcount 1
  CHECK(GetRefcount(b.data(), 0, 4) == 1);
  // order 5: big-endian 32-bit.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 1, 5, 0x01020304);
  CHECK((b[4] == 1 && b[5] == 2 && b[6] == 3 && b[7] == 4));
  // order 6: big-endian 64-bit.
  std::fill(b.begin(), b.end(), 0);
  SetRefcount(b.data(), 1, 6, 0x0102030405060708ull);
  for (int i = 0; i < 8; i++) CHECK(b[8 + i] == i + 1);
  CHECK(b[7] == 0);
}

TEST_CASE("geometry: standard L2") {
  Geometry g = Geometry::Make(16, 4, false);
  CHECK(g.cluster_size == 65536);
  CHECK(g.l2_entry_size == 8);
  CHECK(g.l2_entries == 8192);
  CHECK(g.refcount_bits == 16);
  CHECK(g.refblock_entries == 32768);
  CHECK(g.subcluster_size == 65536);
  CHECK(g.csize_shift() == 54);
  CHECK(g.compressed_offset_mask() == (1ull << 54) - 1);
  CHECK(g.max_refcount() == 0xffff);
  CHECK(g.l2_span() == (512ull << 20));
  CHECK(g.ClusterOf(3 * 65536 + 5) == 3);
  CHECK(g.OffsetInCluster(3 * 65536 + 5) == 5);
  CHECK(g.AlignDown(3 * 65536 + 5) == 3 * 65536);
  CHECK(g.AlignUp(3 * 65536 + 5) == 4 * 65536);
  CHECK(g.AlignUp(3 * 65536) == 3 * 65536);

  Geometry s = Geometry::Make(9, 6, false);
  CHECK(s.cluster_size == 512);
  CHECK(s.l2_entries == 64);
  CHECK(s.refblock_entries == 64);
  CHECK(s.max_refcount() == ~0ull);
  CHECK(s.csize_shift() == 61);
  CHECK(s.l2_span() == 64 * 512);

  Geometry one = Geometry::Make(9, 0, false);
  CHECK(one.refcount_bits == 1);
  CHECK(one.refblock_entries == 4096);
  CHECK(one.max_refcount() == 1);

  Geometry big = Geometry::Make(21, 5, false);
  CHECK(big.cluster_size == (2u << 20));
  CHECK(big.l2_entries == 262144);
  CHECK(big.refblock_entries == (2u << 20) * 8 / 32);
  CHECK(big.csize_shift() == 49);
  CHECK(big.max_refcount() == 0xffffffffull);
}

TEST_CASE("geometry: extended L2") {
  Geometry g = Geometry::Make(16, 4, true);
  CHECK(g.extended_l2);
  CHECK(g.l2_entry_size == 16);
  CHECK(g.l2_entries == 4096);
  CHECK(g.subcluster_size == 2048);
  CHECK(g.l2_span() == 4096ull * 65536);
  CHECK(g.refblock_entries == 32768);
  CHECK(g.csize_shift() == 54);

  Geometry s = Geometry::Make(14, 4, true);
  CHECK(s.l2_entries == 1024);
  CHECK(s.subcluster_size == 512);
  Geometry l = Geometry::Make(21, 4, true);
  CHECK(l.subcluster_size == 65536);
  CHECK(l.l2_entries == 131072);
}

TEST_CASE("L1/L2 masks") {
  CHECK((kL1OffsetMask & kOflagCopied) == 0);
  CHECK((kL2OffsetMask & (kOflagCopied | kOflagCompressed | kOflagZero)) == 0);
  CHECK((kL1OffsetMask & 0x1ff) == 0);
  CHECK((kL1OffsetMask >> 56) == 0);
  CHECK((kL1ReservedMask & kL1OffsetMask) == 0);
  CHECK((kL1ReservedMask | kL1OffsetMask | kOflagCopied) == ~0ull);
  CHECK(kBitmapAllAlloc == 0xffffffffull);
  CHECK((kBitmapAllAlloc & kBitmapAllZero) == 0);
}

}  // namespace
}  // namespace qcowfs::qcow2
