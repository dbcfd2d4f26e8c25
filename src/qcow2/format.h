// qcow2 on-disk constants and entry helpers (reference/qcow2.txt).
#pragma once

#include <cstdint>

#include "util/endian.h"

namespace qcowfs::qcow2 {

constexpr uint32_t kMagic = 0x514649fb;  // "QFI\xfb"
constexpr uint32_t kMinClusterBits = 9;
constexpr uint32_t kMaxClusterBits = 21;
constexpr uint32_t kV2HeaderLength = 72;
constexpr uint32_t kV3MinHeaderLength = 104;
constexpr uint32_t kV3HeaderLength = 112;  // with compression_type + padding
constexpr uint64_t kMaxL1Bytes = 32ull << 20;
constexpr uint64_t kMaxRefcountTableBytes = 8ull << 20;
constexpr uint32_t kMaxBackingNameLength = 1023;

// Incompatible feature bits (header byte 72).
constexpr uint64_t kIncompatDirty = 1ull << 0;
constexpr uint64_t kIncompatCorrupt = 1ull << 1;
constexpr uint64_t kIncompatDataFile = 1ull << 2;
constexpr uint64_t kIncompatCompression = 1ull << 3;
constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
constexpr uint64_t kIncompatKnownMask = 0x1f;
// Compatible feature bits.
constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
// Autoclear feature bits.
constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
constexpr uint64_t kAutoclearKnownMask = kAutoclearDataFileRaw;  // bitmaps: we clear it

// Header extension types.
constexpr uint32_t kExtEnd = 0;
constexpr uint32_t kExtBackingFormat = 0xe2792aca;
constexpr uint32_t kExtFeatureNames = 0x6803f857;
constexpr uint32_t kExtBitmaps = 0x23852875;
constexpr uint32_t kExtCrypto = 0x0537be77;
constexpr uint32_t kExtDataFile = 0x44415441;

constexpr uint8_t kCompressionZlib = 0;
constexpr uint8_t kCompressionZstd = 1;

// L1 / L2 entries.
constexpr uint64_t kOflagCopied = 1ull << 63;
constexpr uint64_t kOflagCompressed = 1ull << 62;
constexpr uint64_t kOflagZero = 1ull << 0;
constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;

// Extended L2 bitmap: bits 0..31 allocated, 32..63 reads as zero.
constexpr uint32_t kSubclusters = 32;
constexpr uint64_t kBitmapAllAlloc = 0xffffffffull;
constexpr uint64_t kBitmapAllZero = 0xffffffff00000000ull;

// Geometry derived from the header.
struct Geometry {
  uint32_t cluster_bits = 16;
  uint64_t cluster_size = 65536;
  bool extended_l2 = false;
  uint32_t l2_entry_size = 8;     // 8 or 16 bytes
  uint64_t l2_entries = 8192;     // entries per L2 table
  uint32_t refcount_order = 4;
  uint32_t refcount_bits = 16;
  uint64_t refblock_entries = 32768;
  uint64_t subcluster_size = 65536;  // == cluster_size without extended L2

  static Geometry Make(uint32_t cluster_bits, uint32_t refcount_order, bool extended_l2) {
    Geometry g;
    g.cluster_bits = cluster_bits;
    g.cluster_size = 1ull << cluster_bits;
    g.extended_l2 = extended_l2;
    g.l2_entry_size = extended_l2 ? 16 : 8;
    g.l2_entries = g.cluster_size / g.l2_entry_size;
    g.refcount_order = refcount_order;
    g.refcount_bits = 1u << refcount_order;
    g.refblock_entries = g.cluster_size * 8 / g.refcount_bits;
    g.subcluster_size = extended_l2 ? g.cluster_size / kSubclusters : g.cluster_size;
    return g;
  }
  uint64_t max_refcount() const {
    return refcount_bits == 64 ? ~0ull : (1ull << refcount_bits) - 1;
  }
  uint64_t l2_span() const { return l2_entries * cluster_size; }  // guest bytes per L2
  uint64_t ClusterOf(uint64_t off) const { return off >> cluster_bits; }
  uint64_t OffsetInCluster(uint64_t off) const { return off & (cluster_size - 1); }
  uint64_t AlignDown(uint64_t off) const { return off & ~(cluster_size - 1); }
  uint64_t AlignUp(uint64_t off) const { return (off + cluster_size - 1) & ~(cluster_size - 1); }
  // Compressed descriptor split (x = 62 - (cluster_bits - 8)).
  uint32_t csize_shift() const { return 62 - (cluster_bits - 8); }
  uint64_t compressed_offset_mask() const { return (1ull << csize_shift()) - 1; }
};

// Refcount entry in a refblock, for every width 1..64 bits.
// Sub-byte widths are packed LSB first; 8 bits and wider are big-endian.
inline uint64_t GetRefcount(const uint8_t* block, uint64_t index, uint32_t order) {
  switch (order) {
    case 0: case 1: case 2: {
      uint32_t bits = 1u << order;
      uint64_t bit = index * bits;
      return (block[bit / 8] >> (bit % 8)) & ((1u << bits) - 1);
    }
    case 3: return block[index];
    case 4: return LoadBE16(block + index * 2);
    case 5: return LoadBE32(block + index * 4);
    default: return LoadBE64(block + index * 8);
  }
}

inline void SetRefcount(uint8_t* block, uint64_t index, uint32_t order, uint64_t value) {
  switch (order) {
    case 0: case 1: case 2: {
      uint32_t bits = 1u << order;
      uint64_t bit = index * bits;
      uint8_t mask = static_cast<uint8_t>(((1u << bits) - 1) << (bit % 8));
      block[bit / 8] = static_cast<uint8_t>((block[bit / 8] & ~mask) |
                                            ((value << (bit % 8)) & mask));
      break;
    }
    case 3: block[index] = static_cast<uint8_t>(value); break;
    case 4: StoreBE16(block + index * 2, static_cast<uint16_t>(value)); break;
    case 5: StoreBE32(block + index * 4, static_cast<uint32_t>(value)); break;
    default: StoreBE64(block + index * 8, value); break;
  }
}

}  // namespace qcowfs::qcow2
