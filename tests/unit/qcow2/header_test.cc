// ParseHeader / ProbeClusterBits / BuildHeaderCluster / PatchHeaderFields on hand-built
// header clusters (reference/qcow2.txt layout), valid and mutated one field at a time.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include "qcow2/format.h"
#include "qcow2/header.h"
#include "util/endian.h"

namespace qcowfs::qcow2 {
namespace {

constexpr uint32_t kBits = 16;
constexpr uint64_t kCs = 1ull << kBits;
constexpr uint64_t kFileSize = 4 * kCs;  // header, reftable, refblock, L1
const std::string kName = "/imgs/test.qcow2";

// A valid v3 image header cluster: 64 MiB, 64 KiB clusters, reftable at cluster 1
// (1 cluster), L1 at cluster 3 (1 entry), header_length 112, no extensions.
std::vector<uint8_t> ValidV3() {
  std::vector<uint8_t> b(kCs, 0);
  StoreBE32(&b[0], kMagic);
  StoreBE32(&b[4], 3);
  StoreBE64(&b[8], 0);            // backing_file_offset
  StoreBE32(&b[16], 0);           // backing_file_size
  StoreBE32(&b[20], kBits);
  StoreBE64(&b[24], 64ull << 20);  // size
  StoreBE32(&b[32], 0);           // crypt_method
  StoreBE32(&b[36], 1);           // l1_size
  StoreBE64(&b[40], 3 * kCs);     // l1_table_offset
  StoreBE64(&b[48], 1 * kCs);     // refcount_table_offset
  StoreBE32(&b[56], 1);           // refcount_table_clusters
  StoreBE32(&b[60], 0);           // nb_snapshots
  StoreBE64(&b[64], 0);           // snapshots_offset
  StoreBE64(&b[72], 0);           // incompatible
  StoreBE64(&b[80], 0);           // compatible
  StoreBE64(&b[88], 0);           // autoclear
  StoreBE32(&b[96], 4);           // refcount_order
  StoreBE32(&b[100], 112);        // header_length
  b[104] = 0;                     // compression_type
  return b;                       // end-of-extensions marker at 112: zeros
}

// Appends an extension at *pos (8-byte aligned, padded).
void PutExt(std::vector<uint8_t>* b, size_t* pos, uint32_t type, const std::string& data) {
  StoreBE32(&(*b)[*pos], type);
  StoreBE32(&(*b)[*pos + 4], static_cast<uint32_t>(data.size()));
  std::memcpy(&(*b)[*pos + 8], data.data(), data.size());
  *pos += 8 + ((data.size() + 7) & ~size_t{7});
}

Result<Header> Parse(const std::vector<uint8_t>& b, uint64_t file_size = kFileSize) {
  return ParseHeader(b.data(), b.size(), file_size, kName);
}

// Parsing must fail with a one-line message naming the file and containing every word.
void ExpectError(const std::vector<uint8_t>& b, std::vector<std::string> words,
                 uint64_t file_size = kFileSize, size_t len = 0) {
  auto r = ParseHeader(b.data(), len ? len : b.size(), file_size, kName);
  REQUIRE_FALSE(r.ok());
  const std::string& m = r.status().message();
  INFO("message: " << m);
  CHECK(r.status().err() != 0);
  CHECK(m.find(kName) != std::string::npos);
  CHECK(m.find('\n') == std::string::npos);
  for (const auto& w : words) CHECK_MESSAGE(m.find(w) != std::string::npos, "missing '" << w << "'");
}

TEST_CASE("header: valid v3 parses every fixed field") {
  auto b = ValidV3();
  StoreBE64(&b[80], kCompatLazyRefcounts);
  StoreBE32(&b[96], 5);
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  const Header& h = *r;
  CHECK(h.version == 3);
  CHECK(h.cluster_bits == kBits);
  CHECK(h.cluster_size() == kCs);
  CHECK(h.size == (64ull << 20));
  CHECK(h.crypt_method == 0);
  CHECK(h.l1_size == 1);
  CHECK(h.l1_table_offset == 3 * kCs);
  CHECK(h.refcount_table_offset == kCs);
  CHECK(h.refcount_table_clusters == 1);
  CHECK(h.nb_snapshots == 0);
  CHECK(h.incompatible == 0);
  CHECK(h.compatible == kCompatLazyRefcounts);
  CHECK(h.autoclear == 0);
  CHECK(h.refcount_order == 5);
  CHECK(h.header_length == 112);
  CHECK(h.compression_type == kCompressionZlib);
  CHECK(h.extensions.empty());
  CHECK(h.backing_file.empty());
  CHECK(h.backing_format.empty());
  CHECK(h.data_file.empty());
  Geometry g = h.geometry();
  CHECK(g.refcount_bits == 32);
  CHECK_FALSE(g.extended_l2);
}

TEST_CASE("header: v3 with 104-byte header and with zstd compression") {
  auto b = ValidV3();
  StoreBE32(&b[100], 104);
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->header_length == 104);
  CHECK(r->compression_type == kCompressionZlib);

  b = ValidV3();
  b[104] = kCompressionZstd;
  StoreBE64(&b[72], kIncompatCompression);
  r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->compression_type == kCompressionZstd);
  // zstd without the incompatible bit is inconsistent.
  StoreBE64(&b[72], 0);
  ExpectError(b, {"compression"});
  b[104] = 7;
  StoreBE64(&b[72], kIncompatCompression);
  ExpectError(b, {"compression"});
}

TEST_CASE("header: v3 extensions are kept in order, unknown ones included, backing name read") {
  auto b = ValidV3();
  size_t pos = 112;
  PutExt(&b, &pos, kExtBackingFormat, "qcow2");
  PutExt(&b, &pos, 0x12345678, std::string("\x01\x02\x03\x00\x05", 5));
  PutExt(&b, &pos, kExtDataFile, "data.raw");
  pos += 8;  // end marker
  const std::string backing = "../base image.qcow2";
  std::memcpy(&b[pos], backing.data(), backing.size());
  StoreBE64(&b[8], pos);
  StoreBE32(&b[16], static_cast<uint32_t>(backing.size()));
  StoreBE64(&b[72], kIncompatDataFile);
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  const Header& h = *r;
  CHECK(h.backing_file == backing);
  CHECK(h.backing_file_offset == pos);
  CHECK(h.backing_file_size == backing.size());
  CHECK(h.backing_format == "qcow2");
  CHECK(h.data_file == "data.raw");
  REQUIRE(h.extensions.size() == 3);
  CHECK(h.extensions[0].type == kExtBackingFormat);
  CHECK(h.extensions[0].data == std::vector<uint8_t>{'q', 'c', 'o', 'w', '2'});
  CHECK(h.extensions[1].type == 0x12345678u);
  CHECK(h.extensions[1].data == std::vector<uint8_t>{1, 2, 3, 0, 5});  // unpadded length
  CHECK(h.extensions[2].type == kExtDataFile);
  CHECK(h.extensions[2].data.size() == 8);
}

TEST_CASE("header: valid v2 with backing format extension and backing file") {
  auto b = ValidV3();
  StoreBE32(&b[4], 2);
  std::memset(&b[72], 0xee, 40);  // v3-only fields are garbage in a v2 image: ignored
  size_t pos = 72;
  PutExt(&b, &pos, kExtBackingFormat, "raw");
  StoreBE64(&b[pos], 0);
  pos += 8;
  const std::string backing = "base.raw";
  std::memcpy(&b[pos], backing.data(), backing.size());
  StoreBE64(&b[8], pos);
  StoreBE32(&b[16], static_cast<uint32_t>(backing.size()));
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  const Header& h = *r;
  CHECK(h.version == 2);
  CHECK(h.header_length == 72);
  CHECK(h.refcount_order == 4);  // v2 is always 16-bit refcounts
  CHECK(h.incompatible == 0);
  CHECK(h.compatible == 0);
  CHECK(h.autoclear == 0);
  CHECK(h.backing_file == "base.raw");
  CHECK(h.backing_format == "raw");
  REQUIRE(h.extensions.size() == 1);
}

TEST_CASE("header: v2 without extensions") {
  auto b = ValidV3();
  StoreBE32(&b[4], 2);
  std::memset(&b[72], 0, 40);
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->version == 2);
  CHECK(r->extensions.empty());
}

TEST_CASE("header: ProbeClusterBits") {
  auto b = ValidV3();
  auto r = ProbeClusterBits(b.data(), kHeaderProbeBytes, kName);
  REQUIRE(r.ok());
  CHECK(*r == kBits);
  StoreBE32(&b[20], 9);
  CHECK(ProbeClusterBits(b.data(), 72, kName).value() == 9);
  StoreBE32(&b[20], 21);
  CHECK(ProbeClusterBits(b.data(), 72, kName).value() == 21);
  StoreBE32(&b[20], 22);
  CHECK_FALSE(ProbeClusterBits(b.data(), 72, kName).ok());
  StoreBE32(&b[20], 8);
  CHECK_FALSE(ProbeClusterBits(b.data(), 72, kName).ok());
  b = ValidV3();
  CHECK_FALSE(ProbeClusterBits(b.data(), 71, kName).ok());
  b[0] ^= 1;
  auto bad = ProbeClusterBits(b.data(), 104, kName);
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("magic") != std::string::npos);
}

TEST_CASE("header: rejects bad magic and versions") {
  auto b = ValidV3();
  StoreBE32(&b[0], 0x514649fa);
  ExpectError(b, {"magic"});
  b = ValidV3();
  StoreBE32(&b[4], 1);
  ExpectError(b, {"version 1"});
  StoreBE32(&b[4], 4);
  ExpectError(b, {"version 4"});
  StoreBE32(&b[4], 0);
  ExpectError(b, {"version"});
}

TEST_CASE("header: rejects truncated headers") {
  auto b = ValidV3();
  ExpectError(b, {"short"}, kFileSize, 50);
  ExpectError(b, {}, kFileSize, 71);
  // v3 needs 104 bytes.
  ExpectError(b, {"truncated"}, kFileSize, 72);
  ExpectError(b, {"truncated"}, kFileSize, 103);
  // header_length smaller than the v3 minimum, or beyond the cluster.
  StoreBE32(&b[100], 100);
  ExpectError(b, {"header_length"});
  StoreBE32(&b[100], kCs + 8);
  ExpectError(b, {"header_length"});
}

TEST_CASE("header: rejects cluster_bits out of range") {
  for (uint32_t bits : {0u, 8u, 22u, 31u, 64u}) {
    auto b = ValidV3();
    StoreBE32(&b[20], bits);
    INFO("cluster_bits " << bits);
    ExpectError(b, {"cluster_bits", std::to_string(bits)});
  }
}

TEST_CASE("header: rejects extended L2 with clusters smaller than 16K") {
  auto b = ValidV3();
  b.resize(1 << 13);
  StoreBE32(&b[20], 13);
  // 8K clusters, 64 MiB: extended L2 spans 512 entries * 8K = 4 MiB per L2 -> 16 L1 entries.
  StoreBE32(&b[36], 16);
  StoreBE64(&b[40], 3 << 13);
  StoreBE64(&b[48], 1 << 13);
  StoreBE64(&b[72], kIncompatExtendedL2);
  ExpectError(b, {"extended L2"}, 4 << 13);
  // The same with 16K clusters is fine.
  auto c = ValidV3();
  c.resize(1 << 14);
  StoreBE32(&c[20], 14);
  StoreBE32(&c[36], 64);  // 1024 entries * 16K = 16 MiB per L2 -> 4 needed; 64 is plenty
  StoreBE64(&c[40], 3 << 14);
  StoreBE64(&c[48], 1 << 14);
  StoreBE64(&c[72], kIncompatExtendedL2);
  auto r = ParseHeader(c.data(), c.size(), 4 << 14, kName);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->geometry().extended_l2);
  CHECK(r->geometry().l2_entries == 1024);
}

TEST_CASE("header: rejects refcount_order 7") {
  auto b = ValidV3();
  StoreBE32(&b[96], 7);
  ExpectError(b, {"refcount_order"});
  StoreBE32(&b[96], 6);
  CHECK(Parse(b).ok());
  StoreBE32(&b[96], 0);
  CHECK(Parse(b).ok());
}

TEST_CASE("header: rejects encryption") {
  for (uint32_t m : {1u, 2u}) {
    auto b = ValidV3();
    StoreBE32(&b[32], m);
    INFO("crypt_method " << m);
    ExpectError(b, {"encrypt"});
  }
  // Also in a v2 image.
  auto b = ValidV3();
  StoreBE32(&b[4], 2);
  std::memset(&b[72], 0, 40);
  StoreBE32(&b[32], 1);
  ExpectError(b, {"encrypt"});
}

TEST_CASE("header: rejects unknown incompatible bits, naming them") {
  auto b = ValidV3();
  StoreBE64(&b[72], 1ull << 5);
  ExpectError(b, {"bit 5"});
  StoreBE64(&b[72], 1ull << 63);
  ExpectError(b, {"bit 63"});

  // With a feature-name table that names bit 5, the message uses that name.
  b = ValidV3();
  std::string table(3 * 48, '\0');
  auto entry = [&](int i, uint8_t type, uint8_t bit, const char* name) {
    table[i * 48] = static_cast<char>(type);
    table[i * 48 + 1] = static_cast<char>(bit);
    std::memcpy(&table[i * 48 + 2], name, strlen(name));
  };
  entry(0, 0, 0, "dirty bit");
  entry(1, 1, 5, "compat five (not this one)");  // compatible bit 5: must not be used
  entry(2, 0, 5, "frobnicated clusters");
  size_t pos = 112;
  PutExt(&b, &pos, kExtFeatureNames, table);
  StoreBE64(&b[72], 1ull << 5);
  ExpectError(b, {"frobnicated clusters"});
  auto r = Parse(b);
  CHECK(r.status().message().find("compat five") == std::string::npos);

  // A full 46-byte name (no NUL terminator) is read completely and no further.
  b = ValidV3();
  std::string t2(48, '\0');
  t2[1] = 6;
  std::string longname(46, 'x');
  longname[45] = 'Z';
  std::memcpy(&t2[2], longname.data(), 46);
  pos = 112;
  PutExt(&b, &pos, kExtFeatureNames, t2);
  StoreBE64(&b[72], 1ull << 6);
  ExpectError(b, {longname});
}

TEST_CASE("header: known incompatible bits are accepted") {
  auto b = ValidV3();
  StoreBE64(&b[72], kIncompatDirty | kIncompatCorrupt);
  auto r = Parse(b);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->incompatible == (kIncompatDirty | kIncompatCorrupt));
  // The data-file bit needs a data file name.
  StoreBE64(&b[72], kIncompatDataFile);
  ExpectError(b, {"data file"});
}

TEST_CASE("header: rejects bad L1 table placement and size") {
  auto b = ValidV3();
  StoreBE64(&b[40], 3 * kCs + 512);
  ExpectError(b, {"L1", "aligned"});
  StoreBE64(&b[40], 0);
  ExpectError(b, {"L1", "header"});
  StoreBE64(&b[40], 4 * kCs);  // starts at EOF
  ExpectError(b, {"L1", "end of the file"});
  StoreBE64(&b[40], 100 * kCs);
  ExpectError(b, {"L1", "end of the file"});
  // An L1 table that starts inside the file but runs past its end.
  b = ValidV3();
  StoreBE32(&b[36], kCs / 8 + 1);
  ExpectError(b, {"L1"});
  // Exactly fits.
  StoreBE32(&b[36], kCs / 8);
  CHECK(Parse(b).ok());

  // Too small: 64 MiB fits one L2 (512 MiB span); 1 GiB needs 2 entries.
  b = ValidV3();
  StoreBE64(&b[24], 1ull << 30);
  ExpectError(b, {"L1", "small"});
  StoreBE32(&b[36], 2);
  CHECK(Parse(b).ok());
  StoreBE64(&b[24], (1ull << 30) + 1);
  ExpectError(b, {"L1"});
  // l1_size 0 with size 0 is fine.
  b = ValidV3();
  StoreBE64(&b[24], 0);
  StoreBE32(&b[36], 0);
  CHECK(Parse(b).ok());

  // Absurd: more than 32 MiB of entries.
  b = ValidV3();
  StoreBE32(&b[36], (32u << 20) / 8 + 1);
  ExpectError(b, {"L1"}, 1ull << 40);
  StoreBE32(&b[36], 0x7fffffff);
  ExpectError(b, {"L1"}, 1ull << 40);
  StoreBE32(&b[36], 0xffffffff);
  ExpectError(b, {"L1"}, 1ull << 40);
  // Huge virtual size that would overflow the L1 computation.
  b = ValidV3();
  StoreBE64(&b[24], ~0ull);
  ExpectError(b, {"L1"});
}

TEST_CASE("header: rejects bad refcount table placement") {
  auto b = ValidV3();
  StoreBE64(&b[48], 100 * kCs);
  ExpectError(b, {"refcount table", "end of the file"});
  StoreBE64(&b[48], 0);
  ExpectError(b, {"refcount table", "header"});
  StoreBE64(&b[48], kCs + 8);
  ExpectError(b, {"refcount table", "aligned"});
  b = ValidV3();
  StoreBE32(&b[56], 0);
  ExpectError(b, {"refcount table"});
  StoreBE32(&b[56], 0xffffffff);
  ExpectError(b, {"refcount table"}, 1ull << 50);
  // Runs well past the end.
  b = ValidV3();
  StoreBE32(&b[56], 10);
  ExpectError(b, {"refcount table"});
}

// A refcount table that starts exactly at EOF lies wholly outside the file: reading it
// gives all-zero refcounts (header and L1 included), so the allocator could hand out the
// header cluster. The parser allows one cluster of slack past EOF, which admits it.
TEST_CASE("header: rejects a refcount table starting at end of file") {
  auto b = ValidV3();
  StoreBE64(&b[48], kFileSize);
  ExpectError(b, {"refcount table"});
}

TEST_CASE("header: rejects bad backing file names and extension areas") {
  auto b = ValidV3();
  StoreBE64(&b[8], 512);
  StoreBE32(&b[16], 1024);
  ExpectError(b, {"backing"});
  StoreBE32(&b[16], 1023);
  CHECK(Parse(b).ok());
  // Backing name past the end of the cluster.
  StoreBE64(&b[8], kCs - 10);
  StoreBE32(&b[16], 20);
  ExpectError(b, {"backing"});
  StoreBE64(&b[8], 1ull << 62);
  StoreBE32(&b[16], 5);
  ExpectError(b, {"backing"});

  // An extension whose length runs past the cluster.
  b = ValidV3();
  StoreBE32(&b[112], 0x12345678);
  StoreBE32(&b[116], kCs);
  ExpectError(b, {"extension"});
  StoreBE32(&b[116], 0xffffffff);
  ExpectError(b, {"extension"});
  // Extensions with no end marker before the cluster ends.
  b = ValidV3();
  for (size_t pos = 112; pos + 8 <= kCs; pos += 8) StoreBE32(&b[pos], 0xabcdef01);
  ExpectError(b, {"extension"});
}

TEST_CASE("header: snapshot table checks") {
  auto b = ValidV3();
  StoreBE32(&b[60], 1);
  StoreBE64(&b[64], 2 * kCs);
  CHECK(Parse(b).ok());
  StoreBE64(&b[64], 0);
  ExpectError(b, {"snapshot"});
  StoreBE64(&b[64], 2 * kCs + 8);
  ExpectError(b, {"snapshot"});
  StoreBE64(&b[64], 50 * kCs);
  ExpectError(b, {"snapshot"});
}

TEST_CASE("header: BuildHeaderCluster round-trips through ParseHeader") {
  Header h;
  h.version = 3;
  h.cluster_bits = kBits;
  h.size = 3ull << 30;
  h.l1_size = 6;
  h.l1_table_offset = 3 * kCs;
  h.refcount_table_offset = kCs;
  h.refcount_table_clusters = 1;
  h.incompatible = kIncompatDataFile;
  h.compatible = kCompatLazyRefcounts;
  h.refcount_order = 6;
  h.backing_file = "dir/base.qcow2";
  h.backing_format = "qcow2";
  h.data_file = "image.data";
  auto c = BuildHeaderCluster(&h);
  REQUIRE_MESSAGE(c.ok(), c.status().message());
  REQUIRE(c->size() == kCs);
  CHECK(h.backing_file_offset >= h.header_length);
  CHECK(h.backing_file_size == h.backing_file.size());
  auto r = ParseHeader(c->data(), c->size(), kFileSize, kName);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  const Header& p = *r;
  CHECK(p.version == 3);
  CHECK(p.cluster_bits == kBits);
  CHECK(p.size == h.size);
  CHECK(p.l1_size == 6);
  CHECK(p.l1_table_offset == 3 * kCs);
  CHECK(p.refcount_table_offset == kCs);
  CHECK(p.refcount_table_clusters == 1);
  CHECK(p.incompatible == kIncompatDataFile);
  CHECK(p.compatible == kCompatLazyRefcounts);
  CHECK(p.refcount_order == 6);
  CHECK(p.header_length == h.header_length);
  CHECK(p.backing_file == "dir/base.qcow2");
  CHECK(p.backing_format == "qcow2");
  CHECK(p.data_file == "image.data");
  CHECK(p.backing_file_offset == h.backing_file_offset);
  bool has_names = false;
  for (const auto& e : p.extensions) has_names |= e.type == kExtFeatureNames;
  CHECK(has_names);
  // The feature-name table names the known bits the way qemu does.
  CHECK(DescribeIncompatible(kIncompatDirty | kIncompatCorrupt).find("corrupt") != std::string::npos);

  // v2 round trip, no extensions but a backing name.
  Header v2;
  v2.version = 2;
  v2.cluster_bits = 12;
  v2.size = 10 << 20;
  v2.l1_size = 20;  // 512 entries * 4K = 2 MiB per L2 -> 5 needed
  v2.l1_table_offset = 3 << 12;
  v2.refcount_table_offset = 1 << 12;
  v2.refcount_table_clusters = 1;
  v2.backing_file = "b";
  auto c2 = BuildHeaderCluster(&v2);
  REQUIRE(c2.ok());
  CHECK(c2->size() == 4096);
  auto r2 = ParseHeader(c2->data(), c2->size(), 4 << 12, kName);
  REQUIRE_MESSAGE(r2.ok(), r2.status().message());
  CHECK(r2->version == 2);
  CHECK(r2->backing_file == "b");
  CHECK(r2->size == (10u << 20));
  CHECK(r2->l1_size == 20);
}

TEST_CASE("header: BuildHeaderCluster refuses what does not fit") {
  Header h;
  h.cluster_bits = 9;
  h.size = 1 << 20;
  h.l1_size = 32;
  h.l1_table_offset = 3 * 512;
  h.refcount_table_offset = 512;
  h.refcount_table_clusters = 1;
  h.backing_file = std::string(1024, 'a');
  CHECK_FALSE(BuildHeaderCluster(&h).ok());
  h.backing_file = std::string(400, 'a');  // 1023-byte limit ok, but not in 512 bytes
  h.backing_format = "qcow2";
  CHECK_FALSE(BuildHeaderCluster(&h).ok());
  h.backing_file.clear();
  h.backing_format.clear();
  h.data_file = std::string(450, 'd');
  h.incompatible = kIncompatDataFile;
  CHECK_FALSE(BuildHeaderCluster(&h).ok());
  // A small one fits even in 512 bytes (the feature table may be dropped).
  // A move-assigned string: GCC 12 at -O3 reports a false -Wrestrict in the replace that
  // assigning a literal over the longer string inlines.
  h.data_file = std::string(1, 'd');
  h.backing_file = std::string(200, 'b');
  auto c = BuildHeaderCluster(&h);
  REQUIRE_MESSAGE(c.ok(), c.status().message());
  auto r = ParseHeader(c->data(), c->size(), 4 * 512, kName);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->backing_file == h.backing_file);
  CHECK(r->data_file == "d");
}

TEST_CASE("header: PatchHeaderFields changes only the fixed fields") {
  Header h;
  h.cluster_bits = kBits;
  h.size = 64ull << 20;
  h.l1_size = 1;
  h.l1_table_offset = 3 * kCs;
  h.refcount_table_offset = kCs;
  h.refcount_table_clusters = 1;
  h.backing_file = "base.qcow2";
  h.backing_format = "qcow2";
  auto built = BuildHeaderCluster(&h);
  REQUIRE(built.ok());
  std::vector<uint8_t> orig = *built;
  // Put an unknown extension's bytes and junk past the backing name to see they stay.
  orig[kCs - 1] = 0x5a;

  std::vector<uint8_t> patched = orig;
  Header n = h;
  n.size = 5ull << 30;
  n.l1_size = 10;
  n.l1_table_offset = 7 * kCs;
  n.refcount_table_offset = 9 * kCs;
  n.refcount_table_clusters = 2;
  n.incompatible = kIncompatDirty;
  n.autoclear = 0;
  n.backing_file = "SHOULD NOT BE WRITTEN";
  n.backing_format = "raw";
  PatchHeaderFields(n, &patched);
  for (size_t i = h.header_length; i < kCs; i++) {
    if (patched[i] != orig[i]) {
      FAIL("byte " << i << " past the fixed header changed");
      break;
    }
  }
  CHECK(LoadBE64(&patched[24]) == (5ull << 30));
  CHECK(LoadBE32(&patched[36]) == 10);
  CHECK(LoadBE64(&patched[40]) == 7 * kCs);
  CHECK(LoadBE64(&patched[48]) == 9 * kCs);
  CHECK(LoadBE32(&patched[56]) == 2);
  CHECK(LoadBE64(&patched[72]) == kIncompatDirty);
  auto r = ParseHeader(patched.data(), patched.size(), 20 * kCs, kName);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  CHECK(r->backing_file == "base.qcow2");
  CHECK(r->backing_format == "qcow2");
  CHECK(r->size == (5ull << 30));

  // Patching with the same header reproduces the bytes exactly.
  std::vector<uint8_t> same = orig;
  PatchHeaderFields(h, &same);
  CHECK(same == orig);
}

}  // namespace
}  // namespace qcowfs::qcow2
