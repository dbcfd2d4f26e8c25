#include "support/qcow2_layout.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "qcow2/header.h"
#include "util/endian.h"

namespace qcowfs::testing {
namespace {

// Reads n big-endian 64-bit entries at off.
std::vector<uint64_t> ReadTable(block::BlockDevice* host, uint64_t off, uint64_t n) {
  std::vector<uint8_t> raw(n * 8);
  std::vector<uint64_t> out(n);
  if (!host->Read(off, raw.data(), raw.size()).ok()) return {};
  for (uint64_t i = 0; i < n; i++) out[i] = LoadBE64(&raw[i * 8]);
  return out;
}

}  // namespace

Qcow2Layout ReadQcow2Layout(block::BlockDevice* host) {
  Qcow2Layout out;
  const uint64_t size = host->Size();
  std::vector<uint8_t> probe(std::min<uint64_t>(size, qcow2::kHeaderProbeBytes));
  if (!host->Read(0, probe.data(), probe.size()).ok()) return out;
  auto bits = qcow2::ProbeClusterBits(probe.data(), probe.size(), "layout");
  if (!bits.ok()) return out;
  const uint64_t cs = 1ull << *bits;
  std::vector<uint8_t> c0(std::min<uint64_t>(size, cs));
  if (!host->Read(0, c0.data(), c0.size()).ok()) return out;
  auto h = qcow2::ParseHeader(c0.data(), c0.size(), size, "layout");
  if (!h.ok()) return out;
  out.ok = true;
  out.cluster_bits = h->cluster_bits;
  auto mark = [&](uint64_t off, uint64_t bytes, uint8_t kind) {
    for (uint64_t c = off / cs; c < (off + bytes + cs - 1) / cs; c++) out.clusters[c] |= kind;
  };
  mark(0, cs, kMetaHeader);
  mark(h->l1_table_offset, uint64_t{h->l1_size} * 8, kMetaL1);
  const uint64_t rt_bytes = uint64_t{h->refcount_table_clusters} * cs;
  mark(h->refcount_table_offset, rt_bytes, kMetaReftable);
  for (uint64_t e : ReadTable(host, h->l1_table_offset, h->l1_size))
    if (e & qcow2::kL1OffsetMask) mark(e & qcow2::kL1OffsetMask, cs, kMetaL2);
  for (uint64_t e : ReadTable(host, h->refcount_table_offset, rt_bytes / 8))
    if (e & ~uint64_t{511}) mark(e & ~uint64_t{511}, cs, kMetaRefblock);
  return out;
}

std::string MetaKindNames(uint8_t kinds) {
  static const std::pair<uint8_t, const char*> kNames[] = {{kMetaHeader, "header"},
                                                           {kMetaL1, "L1"},
                                                           {kMetaReftable, "reftable"},
                                                           {kMetaL2, "L2"},
                                                           {kMetaRefblock, "refblock"}};
  std::string s;
  // Appends rather than `"+" + std::string(name)`: GCC 12 at -O3 reports a false
  // -Wrestrict in that operator+.
  for (auto [bit, name] : kNames) {
    if (!(kinds & bit)) continue;
    if (!s.empty()) s += '+';
    s += name;
  }
  return s;
}

}  // namespace qcowfs::testing
