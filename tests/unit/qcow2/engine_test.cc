// Qcow2Image on an in-memory host: data round trips, allocation, L1 and refcount-table
// growth, discard. Images are checked with qemu-img (check + compare against a raw model).
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qcow2/create.h"
#include "qcow2/image.h"
#include "support/mem_device.h"
#include "support/recording_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::qcow2 {
namespace {

using testing::MemDevice;
using testing::RunCommand;
using testing::TempDir;

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

std::unique_ptr<Qcow2Image> OpenMem(MemDevice* mem, const OpenOptions& o = {}) {
  OpenDevices d;
  d.host = mem;
  d.name = "mem.qcow2";
  auto r = Qcow2Image::OpenOn(d, o);
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  return std::move(r).value();
}

std::unique_ptr<Qcow2Image> CreateAndOpen(MemDevice* mem, const CreateOptions& c) {
  Status s = CreateOn(mem, c);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return OpenMem(mem);
}

// qemu-img check (exit 0: no errors, no leaks) and compare against the raw model.
void CheckWithQemu(const MemDevice& mem, const std::vector<uint8_t>& model) {
  testing::RequireTool("qemu-img");
  TempDir dir("qcowfs-engine");
  std::string img = dir.File("img.qcow2");
  std::string raw = dir.File("model.raw");
  WriteFile(img, mem.Contents());
  WriteFile(raw, model);
  auto chk = RunCommand({"qemu-img", "check", "-f", "qcow2", img});
  CHECK_MESSAGE(chk.exit_code == 0, "qemu-img check: " << chk.out << chk.err);
  auto cmp = RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw});
  CHECK_MESSAGE(cmp.exit_code == 0, "qemu-img compare: " << cmp.out << cmp.err);
}

void Fill(std::vector<uint8_t>* buf, uint64_t seed) {
  std::mt19937_64 r(seed);
  for (size_t i = 0; i < buf->size(); i += 8) {
    uint64_t v = r();
    std::memcpy(buf->data() + i, &v, std::min<size_t>(8, buf->size() - i));
  }
}

void ExpectReads(Qcow2Image* img, const std::vector<uint8_t>& model) {
  std::vector<uint8_t> got(model.size());
  const size_t step = 1 << 20;
  for (size_t off = 0; off < model.size(); off += step) {
    size_t n = std::min(step, model.size() - off);
    Status s = img->Read(off, got.data() + off, n);
    REQUIRE_MESSAGE(s.ok(), s.message());
  }
  for (size_t off = 0; off < model.size(); off += 512) {
    if (std::memcmp(got.data() + off, model.data() + off, std::min<size_t>(512, model.size() - off)) != 0) {
      FAIL("data differs at guest offset " << off);
      break;
    }
  }
}

// Flushes and closes the image, reopens it and checks the data again, then
// qemu-img check + compare.
void CloseReopenAndCheck(MemDevice* mem, std::unique_ptr<Qcow2Image>* img, const std::vector<uint8_t>& model) {
  REQUIRE((*img)->Flush().ok());
  ExpectReads(img->get(), model);
  REQUIRE((*img)->Close().ok());
  img->reset();
  auto again = OpenMem(mem);
  ExpectReads(again.get(), model);
  REQUIRE(again->Close().ok());
  again.reset();
  CheckWithQemu(*mem, model);
}

struct Config {
  uint32_t cluster_bits, refcount_order, version;
  bool extended_l2;
};

CreateOptions OptionsFor(const Config& cfg, uint64_t size) {
  CreateOptions c;
  c.size = size;
  c.cluster_bits = cfg.cluster_bits;
  c.refcount_order = cfg.refcount_order;
  c.version = cfg.version;
  c.extended_l2 = cfg.extended_l2;
  return c;
}

TEST_CASE("engine: random writes round-trip across cluster and L2 boundaries") {
  const Config configs[] = {{9, 4, 3, false}, {12, 0, 3, false}, {16, 4, 3, false},
                            {16, 6, 3, true}, {14, 3, 3, true},  {16, 4, 2, false},
                            {10, 1, 3, false}};
  for (const auto& cfg : configs) {
    CAPTURE(cfg.cluster_bits);
    CAPTURE(cfg.refcount_order);
    CAPTURE(cfg.version);
    CAPTURE(cfg.extended_l2);
    MemDevice mem;
    CreateOptions c = OptionsFor(cfg, 6ull << 20);
    auto img = CreateAndOpen(&mem, c);
    CHECK(img->Size() == c.size);
    std::vector<uint8_t> model(c.size, 0);
    std::mt19937_64 rng(cfg.cluster_bits * 100 + cfg.refcount_order);
    const uint64_t cs = 1ull << cfg.cluster_bits;
    const uint64_t l2span = img->geometry().l2_span();
    // Writes straddling cluster and L2-table boundaries, then random ones.
    std::vector<std::pair<uint64_t, uint64_t>> ws = {
        {cs - 1, 2}, {3 * cs - 100, cs + 200}, {l2span - 7, 14}, {2 * l2span - cs / 2, 3 * cs},
        {c.size - 1, 1}, {0, 1}, {c.size - 3 * cs - 5, 3 * cs + 5}};
    for (int i = 0; i < 150; i++) {
      uint64_t len = 1 + rng() % (3 * cs + 1000);
      if (i % 5 == 0) len = 1 + rng() % 200000;
      len = std::min<uint64_t>(len, c.size);
      uint64_t off = rng() % (c.size - len + 1);
      ws.push_back({off, len});
    }
    for (auto [off, len] : ws) {
      if (off + len > c.size) continue;
      std::vector<uint8_t> buf(len);
      Fill(&buf, rng());
      Status s = img->Write(off, buf.data(), len);
      REQUIRE_MESSAGE(s.ok(), s.message());
      std::memcpy(model.data() + off, buf.data(), len);
      // Read back a window around the write.
      uint64_t a = off > cs ? off - cs : 0;
      uint64_t b = std::min<uint64_t>(c.size, off + len + cs);
      std::vector<uint8_t> got(b - a);
      REQUIRE(img->Read(a, got.data(), got.size()).ok());
      REQUIRE(std::memcmp(got.data(), model.data() + a, got.size()) == 0);
    }
    ExpectReads(img.get(), model);
    CloseReopenAndCheck(&mem, &img, model);
  }
}

// A large write over allocated clusters goes through the multi-cluster in-place
// path: runs of contiguous host clusters, a new run per host jump (more runs than
// one call takes), and it must stop at clusters that need the slow path (a hole,
// a zero cluster, a zeroed subcluster) and go on after them.
TEST_CASE("engine: a write over many allocated clusters, holes and zeros in between, round-trips") {
  const Config configs[] = {{16, 4, 3, false}, {16, 4, 3, true}, {9, 4, 3, false}, {14, 4, 3, true}};
  for (const auto& cfg : configs) {
    CAPTURE(cfg.cluster_bits);
    CAPTURE(cfg.extended_l2);
    MemDevice mem;
    CreateOptions c = OptionsFor(cfg, 4ull << 20);
    auto img = CreateAndOpen(&mem, c);
    const uint64_t cs = 1ull << cfg.cluster_bits;
    const uint64_t n = std::min<uint64_t>(c.size / cs, 150);  // 512-byte clusters: 2 L2 tables and more
    std::vector<uint8_t> model(c.size, 0);
    std::mt19937_64 rng(cfg.cluster_bits);
    auto write = [&](uint64_t off, uint64_t len) {
      std::vector<uint8_t> buf(len);
      Fill(&buf, rng());
      Status s = img->Write(off, buf.data(), len);
      REQUIRE_MESSAGE(s.ok(), s.message());
      std::memcpy(model.data() + off, buf.data(), len);
    };
    // Allocate back to front: guest order is the reverse of host order, so no two
    // neighbours are contiguous on the host.
    for (uint64_t gc = n; gc-- > 0;) write(gc * cs, cs);
    // Then clusters 20..29 are freed and allocated again front to back.
    REQUIRE(img->Discard(20 * cs, 10 * cs).ok());
    std::memset(model.data() + 20 * cs, 0, 10 * cs);
    for (uint64_t gc = 20; gc < 30; gc++) write(gc * cs, cs);
    // Clusters the fast path must leave alone: a hole, a zero cluster, and a
    // zeroed piece of an allocated one (a zero subcluster with extended L2).
    REQUIRE(img->Discard(5 * cs, cs).ok());
    REQUIRE(img->WriteZeroes(13 * cs, cs, false).ok());
    REQUIRE(img->WriteZeroes(17 * cs + cs / 4, cs / 2, false).ok());
    std::memset(model.data() + 5 * cs, 0, cs);
    std::memset(model.data() + 13 * cs, 0, cs);
    std::memset(model.data() + 17 * cs + cs / 4, 0, cs / 2);
    // One write from the middle of cluster 1 to the middle of cluster n-2, then
    // one over only allocated clusters, then one sector at the very end.
    write(cs + cs / 3, (n - 3) * cs);
    write(31 * cs + 7, (n - 40) * cs);
    write((n - 1) * cs + cs - 1, 1);
    ExpectReads(img.get(), model);
    CloseReopenAndCheck(&mem, &img, model);
  }
}

// A long write over clusters this layer does not allocate gets one run of host clusters
// and one host write per 2 MiB (or per L2 table), not one per cluster: a mirror to a new
// qcow2 target and first-touch writes depend on it. Zero clusters, holes and L2-table
// boundaries are crossed; clusters already allocated go their own way.
TEST_CASE("engine: a long write over unallocated clusters is one host write per run") {
  const Config configs[] = {{16, 4, 3, false}, {16, 4, 3, true}, {9, 4, 3, false}, {14, 1, 3, true}, {12, 4, 2, false}, {12, 6, 3, false}};
  for (const auto& cfg : configs) {
    CAPTURE(cfg.cluster_bits);
    CAPTURE(cfg.extended_l2);
    MemDevice base;
    CreateOptions c = OptionsFor(cfg, 16ull << 20);
    REQUIRE(CreateOn(&base, c).ok());
    testing::HostLog log;
    testing::RecordingDevice host(&log, base);
    OpenDevices d;
    d.host = &host;
    d.name = "rec.qcow2";
    auto r = Qcow2Image::OpenOn(d, {});
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    auto img = std::move(r).value();
    const uint64_t cs = 1ull << cfg.cluster_bits;
    std::vector<uint8_t> model(c.size, 0);
    // Zero flags on part of the range first (v3 only), and one allocated cluster in the
    // middle of the second write.
    if (cfg.version == 3) REQUIRE(img->WriteZeroes(8 * cs, 4 * cs, false).ok());
    std::vector<uint8_t> one(cs);
    Fill(&one, 7);
    const uint64_t lone = (4ull << 20) + 64 * cs;
    REQUIRE(img->Write(lone, one.data(), cs).ok());
    std::memcpy(model.data() + lone, one.data(), cs);
    auto data_writes = [&](size_t from) {
      const auto& ops = log.ops();
      size_t w = 0;
      for (size_t i = from; i < ops.size(); i++)
        if (ops[i].kind == testing::HostOp::kWrite) w++;
      return w;
    };
    auto write = [&](uint64_t off, uint64_t len) {
      std::vector<uint8_t> buf(len);
      Fill(&buf, off ^ len);
      size_t before = log.size();
      Status s = img->Write(off, buf.data(), len);
      REQUIRE_MESSAGE(s.ok(), s.message());
      std::memcpy(model.data() + off, buf.data(), len);
      return before;
    };
    // 1 MiB from cluster 0: one host write of the whole run (or one per L2 table).
    const uint64_t l2_span = cs * (cs / (cfg.extended_l2 ? 16 : 8));
    const uint64_t len1 = 1ull << 20;
    size_t from = write(0, len1);
    const size_t tables1 = (len1 + l2_span - 1) / l2_span;
    const size_t runs1 = std::max<size_t>(tables1, (len1 + (2ull << 20) - 1) / (2ull << 20));
    CHECK(data_writes(from) <= runs1 + 1);
    // 3 MiB from an unaligned start, over the allocated cluster: the head cluster alone,
    // then runs before and after the allocated one.
    from = write((4ull << 20) - cs / 2, 3ull << 20);
    const size_t tables2 = (3ull << 20) / l2_span + 2;
    CHECK(data_writes(from) <= std::max<size_t>(tables2, 2) + 3);
    // Every cluster got a host cluster of its own.
    ExpectReads(img.get(), model);
    REQUIRE(img->Flush().ok());
    REQUIRE(img->Close().ok());
    img.reset();
    CheckWithQemu(host.live(), model);
  }
}

TEST_CASE("engine: reads of unwritten space are zeros; writes beyond the end fail") {
  MemDevice mem;
  CreateOptions c;
  c.size = 1 << 20;
  auto img = CreateAndOpen(&mem, c);
  std::vector<uint8_t> buf(4096, 0xaa);
  REQUIRE(img->Read(12345, buf.data(), buf.size()).ok());
  CHECK(std::all_of(buf.begin(), buf.end(), [](uint8_t b) { return b == 0; }));
  CHECK_FALSE(img->Write((1 << 20) - 10, buf.data(), 11).ok());
  CHECK_FALSE(img->Read((1 << 20) - 10, buf.data(), 11).ok());
  REQUIRE(img->Write((1 << 20) - 10, buf.data(), 10).ok());
  REQUIRE(img->Close().ok());
}

TEST_CASE("engine: the allocator never hands out a host cluster twice") {
  MemDevice mem;
  CreateOptions c;
  c.size = 64ull << 20;
  c.cluster_bits = 12;
  auto img = CreateAndOpen(&mem, c);
  const uint64_t cs = 4096;
  const uint64_t nclusters = c.size / cs;
  std::vector<uint64_t> guest;
  for (uint64_t i = 0; i < 200; i++) guest.push_back((i * 7919 + 13) % nclusters);
  std::sort(guest.begin(), guest.end());
  guest.erase(std::unique(guest.begin(), guest.end()), guest.end());
  std::shuffle(guest.begin(), guest.end(), std::mt19937_64(5));
  std::vector<uint8_t> model(c.size, 0);
  // Interleave whole-cluster writes, partial writes and flushes.
  for (size_t k = 0; k < guest.size(); k++) {
    uint64_t g = guest[k];
    std::vector<uint8_t> buf(cs);
    Fill(&buf, 1000 + g);
    uint64_t in = (k % 3 == 0) ? 100 : 0;
    uint64_t len = cs - in - (k % 5 == 0 ? 7 : 0);
    REQUIRE(img->Write(g * cs + in, buf.data(), len).ok());
    std::memcpy(model.data() + g * cs + in, buf.data(), len);
    if (k % 50 == 49) REQUIRE(img->Flush().ok());
  }
  for (uint64_t g : guest) {
    auto st = img->GetBlockStatus(g * cs, cs);
    REQUIRE(st.ok());
    CHECK(st->type == block::ExtentType::kData);
  }
  auto st = img->GetBlockStatus(guest.empty() ? 0 : ((guest[0] + 1) % nclusters) * cs, cs);
  REQUIRE(st.ok());
  ExpectReads(img.get(), model);
  REQUIRE(img->Close().ok());
  img.reset();
  auto again = OpenMem(&mem);
  ExpectReads(again.get(), model);
  again.reset();
  CheckWithQemu(mem, model);
}

TEST_CASE("engine: L1 table grows on resize") {
  testing::RequireTool("qemu-img");
  MemDevice mem;
  CreateOptions c;
  c.size = 1 << 20;
  c.cluster_bits = 9;  // 64 entries per L2: 32 KiB per L1 entry
  auto img = CreateAndOpen(&mem, c);
  const uint32_t old_l1 = img->header().l1_size;
  CHECK(old_l1 >= 32);
  std::vector<uint8_t> model(64ull << 20, 0);
  std::vector<uint8_t> buf(8192);
  Fill(&buf, 1);
  REQUIRE(img->Write(4096, buf.data(), buf.size()).ok());
  std::memcpy(model.data() + 4096, buf.data(), buf.size());
  Status s = img->Resize(64ull << 20);
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(img->Size() == (64ull << 20));
  Fill(&buf, 2);
  const uint64_t end = (64ull << 20) - buf.size();
  REQUIRE(img->Write(end, buf.data(), buf.size()).ok());
  std::memcpy(model.data() + end, buf.data(), buf.size());
  Fill(&buf, 3);
  REQUIRE(img->Write((32ull << 20) - 100, buf.data(), buf.size()).ok());
  std::memcpy(model.data() + (32ull << 20) - 100, buf.data(), buf.size());
  CHECK(img->header().l1_size >= (64ull << 20) / (64 * 512));
  ExpectReads(img.get(), model);
  REQUIRE(img->Close().ok());
  img.reset();
  auto again = OpenMem(&mem);
  CHECK(again->Size() == (64ull << 20));
  ExpectReads(again.get(), model);
  again.reset();
  CheckWithQemu(mem, model);

  TempDir dir("qcowfs-engine");
  WriteFile(dir.File("i.qcow2"), mem.Contents());
  auto info = RunCommand({"qemu-img", "info", "--output=json", dir.File("i.qcow2")});
  REQUIRE(info.exit_code == 0);
  CHECK_MESSAGE(info.out.find("\"virtual-size\": 67108864") != std::string::npos, info.out);
}

TEST_CASE("engine: refcount table grows past its first cluster") {
  MemDevice mem;
  CreateOptions c;
  c.size = 8ull << 20;
  c.cluster_bits = 9;
  c.refcount_order = 6;  // a refblock covers 64 clusters; one reftable cluster 4096 clusters
  auto img = CreateAndOpen(&mem, c);
  const uint32_t rt_clusters = img->header().refcount_table_clusters;
  REQUIRE(rt_clusters * 512ull / 8 * 64 < 8192);  // 4 MiB of data outgrows it
  std::vector<uint8_t> model(c.size, 0);
  std::vector<uint8_t> buf(64 * 1024);
  for (uint64_t off = 0; off < (4ull << 20); off += buf.size()) {
    Fill(&buf, off);
    Status s = img->Write(off, buf.data(), buf.size());
    REQUIRE_MESSAGE(s.ok(), "at " << off << ": " << s.message());
    std::memcpy(model.data() + off, buf.data(), buf.size());
  }
  ExpectReads(img.get(), model);
  REQUIRE(img->Flush().ok());  // the header picks up the grown table on flush
  CHECK(img->header().refcount_table_clusters > rt_clusters);
  REQUIRE(img->Close().ok());
  img.reset();
  auto again = OpenMem(&mem);
  CHECK(again->header().refcount_table_clusters > rt_clusters);
  ExpectReads(again.get(), model);
  // Keep writing after reopen (allocation continues from the grown structure).
  Fill(&buf, 99);
  REQUIRE(again->Write(5ull << 20, buf.data(), buf.size()).ok());
  std::memcpy(model.data() + (5ull << 20), buf.data(), buf.size());
  REQUIRE(again->Close().ok());
  again.reset();
  CheckWithQemu(mem, model);
}

// 512-byte clusters with 64-bit refcounts: a refcount block covers 64 clusters, so the
// 512-cluster L1 table of a 1 GiB image spans refcount blocks that do not exist yet, some
// of them entirely: their blocks must go outside the new table, each exactly once.
TEST_CASE("engine: an allocation covering whole missing refcount blocks") {
  MemDevice mem;
  CreateOptions c;
  c.size = 1 << 20;
  c.cluster_bits = 9;
  c.refcount_order = 6;
  auto img = CreateAndOpen(&mem, c);
  std::vector<uint8_t> model(1ull << 30, 0);
  std::vector<uint8_t> buf(4096);
  Fill(&buf, 1);
  REQUIRE(img->Write(0, buf.data(), buf.size()).ok());
  std::memcpy(model.data(), buf.data(), buf.size());
  Status s = img->Resize(1ull << 30);
  REQUIRE_MESSAGE(s.ok(), s.message());
  for (uint64_t off : {uint64_t{512} << 20, uint64_t{(1ull << 30) - 4096}, uint64_t{3} << 20}) {
    Fill(&buf, off);
    s = img->Write(off, buf.data(), buf.size());
    REQUIRE_MESSAGE(s.ok(), "at " << off << ": " << s.message());
    std::memcpy(model.data() + off, buf.data(), buf.size());
  }
  CHECK(img->header().l1_size >= (1u << 30) / (64 * 512));
  CHECK(img->CheckRefcounts().ok());
  CloseReopenAndCheck(&mem, &img, model);
}

TEST_CASE("engine: discard frees host space and reads zeros") {
  MemDevice mem;
  CreateOptions c;
  c.size = 8ull << 20;
  auto img = CreateAndOpen(&mem, c);
  std::vector<uint8_t> model(c.size, 0);
  std::vector<uint8_t> buf(1 << 20);
  Fill(&buf, 7);
  REQUIRE(img->Write(0, buf.data(), buf.size()).ok());
  std::memcpy(model.data(), buf.data(), buf.size());
  REQUIRE(img->Write(4 << 20, buf.data(), 65536).ok());  // keeps the file end in place
  std::memcpy(model.data() + (4 << 20), buf.data(), 65536);
  REQUIRE(img->Flush().ok());
  const uint64_t before = mem.AllocatedBytes();
  Status s = img->Discard(0, 1 << 20);
  REQUIRE_MESSAGE(s.ok(), s.message());
  std::memset(model.data(), 0, 1 << 20);
  REQUIRE(img->Flush().ok());
  const uint64_t after = mem.AllocatedBytes();
  CHECK_MESSAGE(after + (1 << 19) <= before, "before " << before << " after " << after);
  auto st = img->GetBlockStatus(0, 1 << 20);
  REQUIRE(st.ok());
  CHECK(st->type != block::ExtentType::kData);
  ExpectReads(img.get(), model);
  // Space freed by the discard is reused: writing 1 MiB elsewhere does not grow the file.
  const uint64_t size_before = mem.Size();
  Fill(&buf, 8);
  REQUIRE(img->Write(2 << 20, buf.data(), buf.size()).ok());
  std::memcpy(model.data() + (2 << 20), buf.data(), buf.size());
  REQUIRE(img->Flush().ok());
  CHECK(mem.Size() <= size_before + 65536);
  ExpectReads(img.get(), model);
  REQUIRE(img->Close().ok());
  img.reset();
  CheckWithQemu(mem, model);
}

}  // namespace
}  // namespace qcowfs::qcow2
