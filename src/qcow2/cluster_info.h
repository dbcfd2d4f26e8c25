// Decoded L2 entry: cluster type plus per-subcluster state (one subcluster
// without extended L2). Internal to the qcow2 module.
#pragma once

#include <cstdint>

#include "qcow2/format.h"
#include "qcow2/image.h"

namespace qcowfs::qcow2 {

enum class SubState { kUnalloc, kZero, kData };

struct Qcow2Image::ClusterInfo {
  enum Type { kUnallocated, kNormal, kCompressed, kInvalid } type = kUnallocated;
  uint64_t entry = 0;   // raw first word
  uint64_t bitmap = 0;  // extended L2 bitmap, or synthesized (bit 0 data, bit 32 zero)
  uint64_t host = 0;    // kNormal: host cluster offset
  bool copied = false;  // refcount is exactly 1: may be written in place
  // Extended L2, as QEMU's QCOW2_SUBCLUSTER_INVALID: a subcluster both allocated and
  // zero, or an allocation bit on an unallocated cluster. Every read and data write of
  // the cluster fails with EIO; whole-cluster zeroing and discard replace the entry, and
  // zeroing whole subclusters sets their bits, as in QEMU.
  bool bad_bitmap = false;
  uint32_t nsub = 1;

  SubState Sub(uint32_t s) const {
    if (type == kCompressed) return SubState::kData;
    if (type == kInvalid) return SubState::kZero;
    if (bitmap & (1ull << s)) return type == kNormal ? SubState::kData : SubState::kUnalloc;
    if (bitmap & (1ull << (32 + s))) return SubState::kZero;
    return SubState::kUnalloc;
  }
};

}  // namespace qcowfs::qcow2
