#include "qcow2/header.h"

#include <cstring>

#include "util/endian.h"

namespace qcowfs::qcow2 {
namespace {

Status Bad(const std::string& name, const std::string& what) {
  return Status::Invalid(name + ": " + what);
}

std::string Hex(uint64_t v) {
  char b[32];
  snprintf(b, sizeof(b), "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

// Names of incompatible bits from the feature-name table, if the image has one.
std::string FeatureName(const Header& h, int bit) {
  for (const auto& e : h.extensions) {
    if (e.type != kExtFeatureNames) continue;
    for (size_t i = 0; i + 48 <= e.data.size(); i += 48) {
      if (e.data[i] == 0 && e.data[i + 1] == bit) {
        const char* s = reinterpret_cast<const char*>(&e.data[i + 2]);
        return std::string(s, strnlen(s, 46));
      }
    }
  }
  return "";
}

}  // namespace

std::string DescribeIncompatible(uint64_t bits) {
  static const char* kNames[] = {"dirty", "corrupt", "external data file", "compression type",
                                 "extended L2 entries"};
  std::string out;
  for (int i = 0; i < 64; i++) {
    if (!(bits & (1ull << i))) continue;
    if (!out.empty()) out += ", ";
    out += i < 5 ? kNames[i] : "bit " + std::to_string(i);
  }
  return out;
}

Result<uint32_t> ProbeClusterBits(const uint8_t* buf, size_t len, const std::string& name) {
  if (len < kV2HeaderLength) return Bad(name, "not a qcow2 image (file too short for a header)");
  if (LoadBE32(buf) != kMagic) return Bad(name, "not a qcow2 image (bad magic)");
  uint32_t version = LoadBE32(buf + 4);
  if (version != 2 && version != 3)
    return Bad(name, "unsupported qcow2 version " + std::to_string(version));
  uint32_t bits = LoadBE32(buf + 20);
  if (bits < kMinClusterBits || bits > kMaxClusterBits)
    return Bad(name, "cluster_bits " + std::to_string(bits) + " out of range 9..21");
  return bits;
}

Result<Header> ParseHeader(const uint8_t* buf, size_t len, uint64_t file_size,
                           const std::string& name) {
  ASSIGN_OR_RETURN(uint32_t bits, ProbeClusterBits(buf, len, name));
  Header h;
  h.version = LoadBE32(buf + 4);
  h.backing_file_offset = LoadBE64(buf + 8);
  h.backing_file_size = LoadBE32(buf + 16);
  h.cluster_bits = bits;
  h.size = LoadBE64(buf + 24);
  h.crypt_method = LoadBE32(buf + 32);
  h.l1_size = LoadBE32(buf + 36);
  h.l1_table_offset = LoadBE64(buf + 40);
  h.refcount_table_offset = LoadBE64(buf + 48);
  h.refcount_table_clusters = LoadBE32(buf + 56);
  h.nb_snapshots = LoadBE32(buf + 60);
  h.snapshots_offset = LoadBE64(buf + 64);
  const uint64_t cs = 1ull << bits;
  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    if (len < kV3MinHeaderLength) return Bad(name, "truncated version 3 header");
    h.incompatible = LoadBE64(buf + 72);
    h.compatible = LoadBE64(buf + 80);
    h.autoclear = LoadBE64(buf + 88);
    h.refcount_order = LoadBE32(buf + 96);
    h.header_length = LoadBE32(buf + 100);
    if (h.header_length < kV3MinHeaderLength || h.header_length > len || h.header_length > cs)
      return Bad(name, "invalid header_length " + std::to_string(h.header_length));
    if (h.header_length > 104) h.compression_type = buf[104];
  }
  // Extensions, needed before refusing unknown bits (the feature-name table).
  size_t pos = h.header_length;
  if (len > cs) len = static_cast<size_t>(cs);
  while (true) {
    if (pos + 8 > len) {
      if (h.version == 3 || pos < len) return Bad(name, "header extensions run past the first cluster");
      break;
    }
    uint32_t type = LoadBE32(buf + pos);
    uint32_t elen = LoadBE32(buf + pos + 4);
    pos += 8;
    if (type == kExtEnd) break;
    if (elen > len - pos) return Bad(name, "header extension " + Hex(type) + " runs past the first cluster");
    HeaderExtension e{type, std::vector<uint8_t>(buf + pos, buf + pos + elen)};
    if (type == kExtBackingFormat) h.backing_format.assign(e.data.begin(), e.data.end());
    if (type == kExtDataFile) h.data_file.assign(e.data.begin(), e.data.end());
    h.extensions.push_back(std::move(e));
    pos += (elen + 7) & ~7u;
  }

  if (h.crypt_method != 0) return Bad(name, "encrypted images are not supported (encryption method " + std::to_string(h.crypt_method) + ")");
  uint64_t unknown = h.incompatible & ~kIncompatKnownMask;
  if (unknown) {
    std::string names;
    for (int i = 0; i < 64; i++) {
      if (!(unknown & (1ull << i))) continue;
      std::string n = FeatureName(h, i);
      if (!names.empty()) names += ", ";
      names += n.empty() ? "unknown incompatible feature bit " + std::to_string(i) : n + " (bit " + std::to_string(i) + ")";
    }
    return Bad(name, "unsupported qcow2 feature(s): " + names);
  }
  if (h.refcount_order > 6) return Bad(name, "refcount_order " + std::to_string(h.refcount_order) + " out of range 0..6");
  if ((h.incompatible & kIncompatExtendedL2) && bits < 14)
    return Bad(name, "extended L2 entries need a cluster size of at least 16K");
  if (h.compression_type > kCompressionZstd) return Bad(name, "unknown compression type " + std::to_string(h.compression_type));
  if (h.compression_type != kCompressionZlib && !(h.incompatible & kIncompatCompression))
    return Bad(name, "compression type set without the compression type feature bit");
  if ((h.autoclear & kAutoclearDataFileRaw) && !(h.incompatible & kIncompatDataFile))
    h.autoclear &= ~kAutoclearDataFileRaw;  // meaningless without a data file
  Geometry g = h.geometry();

  // Backing file name.
  if (h.backing_file_offset != 0) {
    if (h.backing_file_size > kMaxBackingNameLength) return Bad(name, "backing file name too long");
    if (h.backing_file_offset > cs || h.backing_file_offset + h.backing_file_size > len)
      return Bad(name, "backing file name lies outside the first cluster");
    h.backing_file.assign(reinterpret_cast<const char*>(buf + h.backing_file_offset), h.backing_file_size);
    if ((h.incompatible & kIncompatDataFile) && (h.autoclear & kAutoclearDataFileRaw))
      return Bad(name, "a raw external data file cannot have a backing file");
  }
  if ((h.incompatible & kIncompatDataFile) && h.data_file.empty())
    return Bad(name, "image needs an external data file but names none");

  // L1 table.
  if (h.l1_table_offset % cs) return Bad(name, "L1 table offset " + Hex(h.l1_table_offset) + " is not cluster aligned");
  if (static_cast<uint64_t>(h.l1_size) * 8 > kMaxL1Bytes) return Bad(name, "L1 table too large (l1_size " + std::to_string(h.l1_size) + ")");
  uint64_t need_l1 = (h.size + g.l2_span() - 1) / g.l2_span();
  if (h.size > (1ull << 56) || h.l1_size < need_l1) return Bad(name, "L1 table too small for the virtual size (l1_size " + std::to_string(h.l1_size) + ")");
  if (h.l1_size > 0) {
    if (h.l1_table_offset < cs) return Bad(name, "L1 table overlaps the header");
    if (h.l1_table_offset + uint64_t{h.l1_size} * 8 > file_size)
      return Bad(name, "L1 table at " + Hex(h.l1_table_offset) + " lies beyond the end of the file");
  }
  // Refcount table.
  if (h.refcount_table_offset % cs) return Bad(name, "refcount table offset is not cluster aligned");
  if (h.refcount_table_clusters == 0) return Bad(name, "refcount table is empty");
  if (uint64_t{h.refcount_table_clusters} * cs > kMaxRefcountTableBytes) return Bad(name, "refcount table too large");
  if (h.refcount_table_offset < cs) return Bad(name, "refcount table overlaps the header");
  if (h.refcount_table_offset >= file_size ||
      h.refcount_table_offset + uint64_t{h.refcount_table_clusters} * cs > file_size)
    return Bad(name, "refcount table at " + Hex(h.refcount_table_offset) + " lies beyond the end of the file");
  // Snapshot table.
  if (h.nb_snapshots > 65536) return Bad(name, "too many snapshots");
  if (h.nb_snapshots > 0) {
    if (h.snapshots_offset % cs || h.snapshots_offset < cs) return Bad(name, "snapshot table offset invalid");
    if (h.snapshots_offset >= file_size) return Bad(name, "snapshot table lies beyond the end of the file");
  }
  return h;
}

void PatchHeaderFields(const Header& h, std::vector<uint8_t>* c0) {
  uint8_t* b = c0->data();
  StoreBE32(b + 0, kMagic);
  StoreBE32(b + 4, h.version);
  StoreBE64(b + 8, h.backing_file_offset);
  StoreBE32(b + 16, h.backing_file_size);
  StoreBE32(b + 20, h.cluster_bits);
  StoreBE64(b + 24, h.size);
  StoreBE32(b + 32, h.crypt_method);
  StoreBE32(b + 36, h.l1_size);
  StoreBE64(b + 40, h.l1_table_offset);
  StoreBE64(b + 48, h.refcount_table_offset);
  StoreBE32(b + 56, h.refcount_table_clusters);
  StoreBE32(b + 60, h.nb_snapshots);
  StoreBE64(b + 64, h.snapshots_offset);
  if (h.version >= 3) {
    StoreBE64(b + 72, h.incompatible);
    StoreBE64(b + 80, h.compatible);
    StoreBE64(b + 88, h.autoclear);
    StoreBE32(b + 96, h.refcount_order);
    StoreBE32(b + 100, h.header_length);
    if (h.header_length > 104) b[104] = h.compression_type;
  }
}

Result<std::vector<uint8_t>> BuildHeaderCluster(Header* h) {
  const uint64_t cs = h->cluster_size();
  std::vector<uint8_t> c(cs, 0);
  h->header_length = h->version >= 3 ? kV3HeaderLength : kV2HeaderLength;
  size_t pos = h->header_length;
  auto put_ext = [&](uint32_t type, const void* data, size_t n) -> bool {
    size_t padded = (n + 7) & ~size_t{7};
    if (pos + 8 + padded + 8 > cs) return false;
    StoreBE32(&c[pos], type);
    StoreBE32(&c[pos + 4], static_cast<uint32_t>(n));
    std::memcpy(&c[pos + 8], data, n);
    pos += 8 + padded;
    return true;
  };
  bool ok = true;
  if (!h->backing_format.empty())
    ok &= put_ext(kExtBackingFormat, h->backing_format.data(), h->backing_format.size());
  if (!h->data_file.empty()) ok &= put_ext(kExtDataFile, h->data_file.data(), h->data_file.size());
  if (h->version >= 3) {
    static const struct { uint8_t type, bit; const char* name; } kFeatures[] = {
        {0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
        {0, 3, "compression type"}, {0, 4, "extended L2 entries"}, {1, 0, "lazy refcounts"},
        {2, 0, "bitmaps"}, {2, 1, "raw external data"}};
    std::vector<uint8_t> table(sizeof(kFeatures) / sizeof(kFeatures[0]) * 48, 0);
    for (size_t i = 0; i < sizeof(kFeatures) / sizeof(kFeatures[0]); i++) {
      table[i * 48] = kFeatures[i].type;
      table[i * 48 + 1] = kFeatures[i].bit;
      std::memcpy(&table[i * 48 + 2], kFeatures[i].name, strlen(kFeatures[i].name));
    }
    if (pos + 8 + table.size() + 8 + h->backing_file.size() <= cs)
      put_ext(kExtFeatureNames, table.data(), table.size());
  }
  pos += 8;  // end-of-extensions marker (zeros)
  if (!ok) return Status::Invalid("header extensions do not fit in the first cluster");
  if (!h->backing_file.empty()) {
    if (h->backing_file.size() > kMaxBackingNameLength) return Status::Invalid("backing file name too long");
    if (pos + h->backing_file.size() > cs) return Status::Invalid("backing file name does not fit in the first cluster");
    h->backing_file_offset = pos;
    h->backing_file_size = static_cast<uint32_t>(h->backing_file.size());
    std::memcpy(&c[pos], h->backing_file.data(), h->backing_file.size());
  } else {
    h->backing_file_offset = 0;
    h->backing_file_size = 0;
  }
  PatchHeaderFields(*h, &c);
  return c;
}

}  // namespace qcowfs::qcow2
