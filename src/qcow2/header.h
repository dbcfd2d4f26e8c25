// qcow2 header: parse and validate ("parse, then trust"), patch fields in place,
// and build fresh headers for create.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qcow2/format.h"
#include "util/status.h"

namespace qcowfs::qcow2 {

struct HeaderExtension {
  uint32_t type;
  std::vector<uint8_t> data;
};

struct Header {
  uint32_t version = 3;
  uint64_t backing_file_offset = 0;
  uint32_t backing_file_size = 0;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible = 0;
  uint64_t compatible = 0;
  uint64_t autoclear = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = kV3HeaderLength;
  uint8_t compression_type = kCompressionZlib;

  // Extensions in file order, unknown ones included (preserved on rewrite).
  std::vector<HeaderExtension> extensions;
  std::string backing_file;
  std::string backing_format;
  std::string data_file;

  Geometry geometry() const {
    return Geometry::Make(cluster_bits, refcount_order, (incompatible & kIncompatExtendedL2) != 0);
  }
  uint64_t cluster_size() const { return 1ull << cluster_bits; }
};

// Bytes to read before ParseHeader can tell the cluster size.
constexpr size_t kHeaderProbeBytes = kV3MinHeaderLength;

// Reads the cluster size from the fixed part, or fails on bad magic/version/bits.
Result<uint32_t> ProbeClusterBits(const uint8_t* buf, size_t len, const std::string& name);

// Parses the first cluster (buf holds min(cluster size, file size) bytes) and
// validates every field against file_size. Errors name `name` and the field.
Result<Header> ParseHeader(const uint8_t* buf, size_t len, uint64_t file_size,
                           const std::string& name);

// Writes the fixed header fields of h into cluster0 (the image's original first
// cluster), leaving extensions and the backing name untouched.
void PatchHeaderFields(const Header& h, std::vector<uint8_t>* cluster0);

// A complete first cluster for a new image: header, extensions (backing format,
// data file, feature names), backing file name. Sets backing_file_offset/size.
Result<std::vector<uint8_t>> BuildHeaderCluster(Header* h);

// "dirty, corrupt, ..." names of incompatible bits, for messages.
std::string DescribeIncompatible(uint64_t bits);

}  // namespace qcowfs::qcow2
