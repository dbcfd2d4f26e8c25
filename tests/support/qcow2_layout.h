// Which host clusters of a qcow2 image hold metadata, and of what kind: the header, the
// active L1 table, the refcount table, L2 tables and refcount blocks (snapshot tables are
// not followed). Crash tests use it to name what the writes before a sync point touched.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "block/block_device.h"

namespace qcowfs::testing {

enum MetaKind : uint8_t {
  kMetaHeader = 1 << 0,
  kMetaL1 = 1 << 1,
  kMetaReftable = 1 << 2,
  kMetaL2 = 1 << 3,
  kMetaRefblock = 1 << 4,
};

struct Qcow2Layout {
  uint32_t cluster_bits = 0;
  std::map<uint64_t, uint8_t> clusters;  // host cluster index -> MetaKind bits
  bool ok = false;                       // false: the header did not parse

  uint8_t KindOf(uint64_t cluster) const {
    auto it = clusters.find(cluster);
    return it == clusters.end() ? 0 : it->second;
  }
};

// Reads the layout of the image on host (an unparsable header gives ok == false).
Qcow2Layout ReadQcow2Layout(block::BlockDevice* host);

// "header+L2" style names of a MetaKind bit set ("" for none).
std::string MetaKindNames(uint8_t kinds);

}  // namespace qcowfs::testing
