// Randomized model test: thousands of random guest operations against a Qcow2Image
// and a flat in-memory model, for every image flavour qemu-img makes (SPEC §4).
//
// For each configuration: qemu-img/qemu-io build the image (with data, zero clusters,
// backing files, compressed clusters, snapshots ...). The model starts as the whole
// image read through our engine, which must equal `qemu-img convert -O raw`. Then random
// writes (straddling cluster and subcluster boundaries), discards, write-zeroes,
// flushes, reads, block-status queries and close/reopen cycles run against both. At the
// end `qemu-img check` must be clean and `qemu-img compare` must find the image equal to
// the model.
//
// QCOWFS_MODEL_OPS overrides the number of operations per configuration.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "block/block_device.h"
#include "qcow2/image.h"
#include "support/must.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace {

using qcowfs::block::ExtentType;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::CmdResult;
using qcowfs::testing::Join;
using qcowfs::testing::Must;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * 1024;

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  REQUIRE_MESSAGE(f.good(), "cannot write " << path);
}

// First differing offset of a and b over n bytes, or -1.
int64_t FirstDiff(const uint8_t* a, const uint8_t* b, uint64_t n) {
  if (memcmp(a, b, n) == 0) return -1;
  for (uint64_t i = 0; i < n; ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return -1;
}

std::vector<uint8_t> QemuRaw(const TempDir& dir, const std::string& img,
                             const std::string& snapshot = "") {
  std::string out = dir.File(snapshot.empty() ? "qemu-view.raw" : "qemu-snap.raw");
  std::vector<std::string> argv = {"qemu-img", "convert", "-U", "-f", "qcow2"};
  if (!snapshot.empty()) {
    argv.push_back("-l");
    argv.push_back("snapshot.name=" + snapshot);
  }
  argv.insert(argv.end(), {"-O", "raw", img, out});
  Must(argv);
  std::vector<uint8_t> data = ReadWholeFile(out);
  std::remove(out.c_str());
  return data;
}

std::unique_ptr<Qcow2Image> OpenImage(const std::string& path) {
  auto r = Qcow2Image::Open(path, OpenOptions{});
  REQUIRE_MESSAGE(r.ok(), "open " << path << ": " << r.status().message());
  return std::move(r).value();
}

std::vector<uint8_t> ReadAll(Qcow2Image* img) {
  std::vector<uint8_t> buf(img->Size());
  const uint64_t chunk = 4 * MiB;
  for (uint64_t off = 0; off < buf.size(); off += chunk) {
    uint64_t n = std::min<uint64_t>(chunk, buf.size() - off);
    qcowfs::Status s = img->Read(off, buf.data() + off, n);
    REQUIRE_MESSAGE(s.ok(), "read " << off << "+" << n << ": " << s.message());
  }
  return buf;
}

// ---- image construction -------------------------------------------------------------

enum class Setup {
  kPlain,          // qemu-img create + qemu-io fill
  kQcow2Backing,   // top over a filled qcow2 base (20 MiB, smaller than the top)
  kRawBacking,     // top over a filled raw base
  kCompressed,     // qemu-img convert -c of mixed content
  kSnapshot,       // plain + internal snapshot s1
};

struct ModelConfig {
  std::string name;
  uint64_t seed;
  Setup setup = Setup::kPlain;
  std::vector<std::string> opts;  // -o options for the image (top image for backing)
  uint64_t cluster_size = 64 * KiB;
  bool extended_l2 = false;
  uint64_t size = 32 * MiB;
  int ops = 2000;
  bool resize = false;       // grow once mid-run
  bool data_file = false;    // add -o data_file=<dir>/img.data
  std::string compression;   // kCompressed: "zlib" or "zstd"
};

std::string OptString(const ModelConfig& c, const TempDir& dir) {
  std::vector<std::string> o = c.opts;
  if (c.cluster_size != 64 * KiB) o.push_back("cluster_size=" + std::to_string(c.cluster_size));
  if (c.extended_l2) o.push_back("extended_l2=on");
  if (c.data_file) o.insert(o.begin(), "data_file=" + dir.File("img.data"));
  std::string s;
  for (const auto& x : o) s += (s.empty() ? "" : ",") + x;
  return s;
}

void QemuIo(const std::string& fmt, const std::string& img, const std::vector<std::string>& cmds) {
  std::vector<std::string> argv = {"qemu-io", "-f", fmt};
  for (const auto& c : cmds) {
    argv.push_back("-c");
    argv.push_back(c);
  }
  argv.push_back(img);
  Must(argv);
}

// Content for a qcow2 image of `size` bytes: data runs, zero-flag ranges, discards,
// including unaligned ones (qemu does the read-modify-write).
std::vector<std::string> FillCommands(uint64_t size) {
  auto n = [](uint64_t v) { return std::to_string(v); };
  return {
      "write -P 0x11 0 1M",
      "write -P 0x22 " + n(size / 2) + " 300k",
      "write -P 0x33 " + n(3 * MiB + 512) + " 70k",
      "write -P 0x44 " + n(size - 256 * KiB) + " 256k",
      "write -z " + n(size / 2 + 64 * KiB) + " 128k",
      "discard " + n(512 * KiB) + " 128k",
      "write -P 0x55 " + n(5 * MiB) + " 2M",
      "write -z " + n(5 * MiB + 512 * KiB) + " 512k",
      "write -P 0x66 " + n(9 * MiB + 4096) + " 12k",
  };
}

// Deterministic mixed-compressibility raw content for the compressed configurations.
std::vector<uint8_t> MixedContent(uint64_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> d(size, 0);
  const uint64_t chunk = 16 * KiB;
  for (uint64_t off = 0; off < size; off += chunk) {
    switch (rng() % 6) {
      case 0:  // zeros
        break;
      case 1:  // constant
        memset(&d[off], static_cast<int>(rng() & 0xff), chunk);
        break;
      case 2:  // incompressible
        for (uint64_t i = 0; i < chunk; ++i) d[off + i] = static_cast<uint8_t>(rng());
        break;
      default:  // compressible text-like
        for (uint64_t i = 0; i < chunk; ++i) d[off + i] = static_cast<uint8_t>('a' + rng() % 6);
        break;
    }
  }
  return d;
}

std::string SizeArg(uint64_t v) { return std::to_string(v); }

// Builds the image at dir/img.qcow2 and returns its path.
std::string BuildImage(const ModelConfig& c, const TempDir& dir) {
  const std::string img = dir.File("img.qcow2");
  const std::string o = OptString(c, dir);
  switch (c.setup) {
    case Setup::kPlain:
    case Setup::kSnapshot: {
      std::vector<std::string> argv = {"qemu-img", "create", "-q", "-f", "qcow2"};
      if (!o.empty()) argv.insert(argv.end(), {"-o", o});
      argv.insert(argv.end(), {img, SizeArg(c.size)});
      Must(argv);
      QemuIo("qcow2", img, FillCommands(c.size));
      if (c.setup == Setup::kSnapshot) {
        Must({"qemu-img", "snapshot", "-c", "s1", img});
        // Diverge from the snapshot before we start, so both views are non-trivial.
        QemuIo("qcow2", img, {"write -P 0x99 128k 256k", "discard 5M 64k"});
      }
      break;
    }
    case Setup::kQcow2Backing:
    case Setup::kRawBacking: {
      const bool raw = c.setup == Setup::kRawBacking;
      const std::string base = dir.File(raw ? "base.raw" : "base.qcow2");
      Must({"qemu-img", "create", "-q", "-f", raw ? "raw" : "qcow2", base, SizeArg(20 * MiB)});
      QemuIo(raw ? "raw" : "qcow2", base,
             {"write -P 0x5a 0 3M", "write -P 0xa5 8M 2M", "write -P 0x3c 19M 1M",
              "write -P 0x17 " + std::to_string(11 * MiB + 1536) + " 5000"});
      std::vector<std::string> argv = {"qemu-img", "create", "-q", "-f", "qcow2",
                                       "-b", raw ? "base.raw" : "base.qcow2",
                                       "-F", raw ? "raw" : "qcow2"};
      if (!o.empty()) argv.insert(argv.end(), {"-o", o});
      argv.insert(argv.end(), {img, SizeArg(c.size)});
      Must(argv);
      // Some data and zero clusters in the top layer, over and beside the backing data.
      QemuIo("qcow2", img,
             {"write -P 0x77 1M 128k", "write -z 2M 64k", "write -P 0x78 " +
              std::to_string(8 * MiB + 4096) + " 8k", "write -P 0x79 25M 64k"});
      break;
    }
    case Setup::kCompressed: {
      const std::string src = dir.File("src.raw");
      WriteWholeFile(src, MixedContent(c.size, c.seed ^ 0xc0ffee));
      std::vector<std::string> opts = {"compression_type=" + c.compression};
      if (c.cluster_size != 64 * KiB) opts.push_back("cluster_size=" + std::to_string(c.cluster_size));
      std::string os;
      for (const auto& x : opts) os += (os.empty() ? "" : ",") + x;
      Must({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", os, src, img});
      std::remove(src.c_str());
      // A few plain clusters and zeroes next to the compressed ones.
      QemuIo("qcow2", img, {"write -P 0x12 2M 100k", "write -z 6M 192k"});
      break;
    }
  }
  return img;
}

// ---- the random run -----------------------------------------------------------------

struct Runner {
  const ModelConfig& cfg;
  std::mt19937_64 rng;
  std::vector<uint8_t> model;
  std::unique_ptr<Qcow2Image> img;
  std::string path;
  uint64_t cs;
  uint64_t sub;  // subcluster size (== cs without extended L2)
  uint64_t hot_base = 0;
  std::string op;  // description of the current operation, for failure messages

  Runner(const ModelConfig& c, std::string p)
      : cfg(c), rng(c.seed), path(std::move(p)), cs(c.cluster_size),
        sub(c.extended_l2 ? c.cluster_size / 32 : c.cluster_size) {}

  uint64_t R(uint64_t n) { return n == 0 ? 0 : rng() % n; }

  uint64_t PickOffset() {
    const uint64_t size = model.size();
    const uint64_t nclusters = size / cs;
    // Half the operations go to a hot window of 48 clusters so that clusters are
    // rewritten, discarded and reallocated; the rest land anywhere.
    uint64_t c = R(3) == 0 ? R(nclusters) : std::min(nclusters - 1, hot_base + R(48));
    uint64_t base = c * cs;
    uint64_t off;
    switch (R(5)) {
      case 0: off = base + R(cs); break;                                          // anywhere
      case 1: off = base + cs - 1 - R(std::min<uint64_t>(cs, 700)); break;        // near the end
      case 2: off = base + R(32) * sub; off = off >= 97 && R(2) ? off - R(97) : off + R(97); break;
      case 3: off = base + (R(2) ? 0 : R(cs / sub) * sub); break;                  // aligned
      default: off = base + R(cs / 512) * 512; break;                              // sector
    }
    return std::min(off, size - 1);
  }

  uint64_t PickLength(uint64_t off) {
    uint64_t len;
    switch (R(6)) {
      case 0: len = 1; break;
      case 1: len = 1 + R(sub); break;
      case 2: len = (1 + R(4)) * sub; break;
      case 3: len = (1 + R(3)) * cs; break;
      default: len = 1 + R(3 * cs); break;
    }
    return std::min<uint64_t>(len, model.size() - off);
  }

  void FillPattern(uint8_t* p, uint64_t n) {
    switch (R(4)) {
      case 0: memset(p, static_cast<int>(R(255) + 1), n); break;
      case 1: {
        uint8_t b = static_cast<uint8_t>(R(256));
        for (uint64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(b + i);
        break;
      }
      default: {
        uint64_t i = 0;
        for (; i + 8 <= n; i += 8) {
          uint64_t v = rng();
          memcpy(p + i, &v, 8);
        }
        for (; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
        break;
      }
    }
  }

  void CheckRange(uint64_t off, uint64_t len) {
    std::vector<uint8_t> buf(len);
    qcowfs::Status s = img->Read(off, buf.data(), len);
    REQUIRE_MESSAGE(s.ok(), op << ": read failed: " << s.message());
    int64_t d = FirstDiff(buf.data(), model.data() + off, len);
    REQUIRE_MESSAGE(d < 0, op << ": read mismatch at guest offset " << off + d << " (got 0x"
                              << std::hex << int(buf[d]) << ", want 0x" << int(model[off + d])
                              << std::dec << ")");
  }

  void CheckAll(const char* when) {
    std::vector<uint8_t> all = ReadAll(img.get());
    REQUIRE(all.size() == model.size());
    int64_t d = FirstDiff(all.data(), model.data(), model.size());
    REQUIRE_MESSAGE(d < 0, when << ": full read mismatch at guest offset " << d << " (got 0x"
                                << std::hex << int(all[d]) << ", want 0x" << int(model[d])
                                << std::dec << ")");
  }

  void Reopen() {
    qcowfs::Status s = img->Close();
    REQUIRE_MESSAGE(s.ok(), op << ": close: " << s.message());
    img.reset();
    img = OpenImage(path);
    REQUIRE(img->Size() == model.size());
  }

  void Run() {
    img = OpenImage(path);
    hot_base = R(model.size() / cs > 48 ? model.size() / cs - 48 : 1);
    int next_reopen = 250 + static_cast<int>(R(100));
    const int resize_at = cfg.resize ? cfg.ops / 2 : -1;
    std::vector<uint8_t> buf;
    for (int i = 0; i < cfg.ops; ++i) {
      if (i == resize_at) {
        uint64_t new_size = model.size() + 5 * MiB + 3 * 512;
        op = "op " + std::to_string(i) + ": Resize " + std::to_string(new_size);
        qcowfs::Status s = img->Resize(new_size);
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
        REQUIRE(img->Size() == new_size);
        model.resize(new_size, 0);
        CheckRange(model.size() - 7 * MiB, 7 * MiB);
        continue;
      }
      if (i == next_reopen) {
        op = "op " + std::to_string(i) + ": close + reopen";
        Reopen();
        CheckAll(op.c_str());
        next_reopen = i + 250 + static_cast<int>(R(100));
        continue;
      }
      const uint64_t kind = R(100);
      const uint64_t off = PickOffset();
      const uint64_t len = PickLength(off);
      std::ostringstream os;
      os << "op " << i << ": ";
      if (kind < 40) {
        os << "Write " << off << "+" << len;
        op = os.str();
        buf.resize(len);
        FillPattern(buf.data(), len);
        qcowfs::Status s = img->Write(off, buf.data(), len);
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
        memcpy(model.data() + off, buf.data(), len);
        if (R(3) == 0) CheckRange(off, len);
      } else if (kind < 48) {
        os << "Discard " << off << "+" << len;
        op = os.str();
        qcowfs::Status s = img->Discard(off, len);
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
        memset(model.data() + off, 0, len);
      } else if (kind < 58) {
        bool unmap = R(2) == 0;
        os << "WriteZeroes " << off << "+" << len << " may_unmap=" << unmap;
        op = os.str();
        qcowfs::Status s = img->WriteZeroes(off, len, unmap);
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
        memset(model.data() + off, 0, len);
      } else if (kind < 60) {
        os << "Allocate " << off << "+" << len;
        op = os.str();
        qcowfs::Status s = img->Allocate(off, len);  // preallocation: reads unchanged
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
        if (R(2) == 0) CheckRange(off, len);
      } else if (kind < 61) {
        op = os.str() + "Flush";
        qcowfs::Status s = img->Flush();
        REQUIRE_MESSAGE(s.ok(), op << ": " << s.message());
      } else if (kind < 88) {
        uint64_t rl = std::min<uint64_t>(model.size() - off, len + R(cs));
        os << "Read " << off << "+" << rl;
        op = os.str();
        CheckRange(off, rl);
      } else {
        uint64_t ql = 1 + R(16 * cs);
        os << "GetBlockStatus " << off << "+" << ql;
        op = os.str();
        auto r = img->GetBlockStatus(off, ql);
        REQUIRE_MESSAGE(r.ok(), op << ": " << r.status().message());
        const auto bs = r.value();
        REQUIRE_MESSAGE(bs.length > 0, op << ": zero-length extent");
        REQUIRE_MESSAGE(bs.length <= std::min(ql, model.size() - off), op << ": extent too long "
                                                                           << bs.length);
        if (bs.type == ExtentType::kZero || bs.type == ExtentType::kUnallocated) {
          // The extent must read as zeros, both in the model and through the engine.
          uint64_t n = std::min<uint64_t>(bs.length, 8 * cs);
          std::vector<uint8_t> zeros(n, 0);
          int64_t d = FirstDiff(model.data() + off, zeros.data(), n);
          REQUIRE_MESSAGE(d < 0, op << ": extent type " << int(bs.type) << " of length "
                                    << bs.length << " but the model has data at " << off + d);
          CheckRange(off, n);
        }
      }
    }
    op = "final close";
    CheckAll("before final close");
    qcowfs::Status s = img->Close();
    REQUIRE_MESSAGE(s.ok(), "final close: " << s.message());
    img.reset();
  }
};

void RunModel(const ModelConfig& cfg) {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
  ModelConfig c = cfg;
  if (const char* e = getenv("QCOWFS_MODEL_OPS"); e && *e) c.ops = atoi(e);
  INFO("config " << c.name << " seed " << c.seed << " ops " << c.ops);
  MESSAGE("model config " << c.name << " seed " << c.seed);
  TempDir dir("qcowfs-model");
  const std::string img = BuildImage(c, dir);

  Runner run(c, img);
  // The engine's view of the fresh image must equal qemu's.
  {
    auto image = OpenImage(img);
    REQUIRE(image->Size() == c.size);
    // qemu-made images have consistent refcounts (CheckRefcounts has no false alarms).
    qcowfs::Status rc = image->CheckRefcounts();
    CHECK_MESSAGE(rc.ok(), "fresh image: " << rc.message());
    run.model = ReadAll(image.get());
    REQUIRE(image->Close().ok());
  }
  const std::vector<uint8_t> initial = run.model;
  {
    std::vector<uint8_t> q = QemuRaw(dir, img);
    REQUIRE(q.size() == run.model.size());
    int64_t d = FirstDiff(q.data(), run.model.data(), q.size());
    REQUIRE_MESSAGE(d < 0, "fresh image: our read differs from qemu-img convert at " << d);
  }
  std::vector<uint8_t> snap_before;
  if (c.setup == Setup::kSnapshot) snap_before = QemuRaw(dir, img, "s1");

  run.Run();

  const std::string model_raw = dir.File("model.raw");
  WriteWholeFile(model_raw, run.model);
  CmdResult chk = RunCommand({"qemu-img", "check", "-f", "qcow2", img});
  INFO("qemu-img check: exit " << chk.exit_code << "\n" << chk.out << chk.err);
  CHECK(chk.exit_code == 0);
  CmdResult cmp = RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, model_raw});
  INFO("qemu-img compare: exit " << cmp.exit_code << "\n" << cmp.out << cmp.err);
  CHECK(cmp.exit_code == 0);
  if (c.resize) {
    CmdResult info = Must({"qemu-img", "info", "--output=json", img});
    CHECK(info.out.find("\"virtual-size\": " + std::to_string(run.model.size())) !=
          std::string::npos);
  }
  if (c.setup == Setup::kSnapshot) {
    std::vector<uint8_t> snap_after = QemuRaw(dir, img, "s1");
    REQUIRE(snap_after.size() == snap_before.size());
    int64_t d = FirstDiff(snap_after.data(), snap_before.data(), snap_after.size());
    CHECK_MESSAGE(d < 0, "snapshot s1 changed at guest offset " << d);
  }
  // Reads back equal after a final reopen, too (read-only).
  {
    OpenOptions ro;
    ro.read_only = true;
    auto r = Qcow2Image::Open(img, ro);
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    std::vector<uint8_t> all = ReadAll(r.value().get());
    CHECK(FirstDiff(all.data(), run.model.data(), all.size()) < 0);
    qcowfs::Status rc = r.value()->CheckRefcounts();
    CHECK_MESSAGE(rc.ok(), "after the run: " << rc.message());
  }
}

ModelConfig Cfg(std::string name, uint64_t seed) {
  ModelConfig c;
  c.name = std::move(name);
  c.seed = seed;
  return c;
}

}  // namespace

TEST_CASE("model: cluster_size=512") {
  auto c = Cfg("c512", 1001);
  c.cluster_size = 512;
  RunModel(c);
}

TEST_CASE("model: cluster_size=4K") {
  auto c = Cfg("c4k", 1002);
  c.cluster_size = 4096;
  RunModel(c);
}

TEST_CASE("model: cluster_size=64K, resize mid-run") {
  auto c = Cfg("c64k-resize", 1003);
  c.resize = true;
  RunModel(c);
}

TEST_CASE("model: cluster_size=2M") {
  auto c = Cfg("c2m", 1004);
  c.cluster_size = 2 * MiB;
  c.size = 64 * MiB;
  c.ops = 800;
  RunModel(c);
}

TEST_CASE("model: refcount_bits=1") {
  auto c = Cfg("rc1-4k", 1005);
  c.opts = {"refcount_bits=1"};
  c.cluster_size = 4096;
  RunModel(c);
}

TEST_CASE("model: refcount_bits=16, 16K clusters") {
  auto c = Cfg("rc16-16k", 1006);
  c.opts = {"refcount_bits=16"};
  c.cluster_size = 16 * KiB;
  RunModel(c);
}

TEST_CASE("model: refcount_bits=64, 512-byte clusters") {
  // 64 refcounts per refblock: the refcount table has to grow repeatedly.
  auto c = Cfg("rc64-512", 1007);
  c.opts = {"refcount_bits=64"};
  c.cluster_size = 512;
  RunModel(c);
}

TEST_CASE("model: extended_l2=on, 64K clusters") {
  auto c = Cfg("extl2-64k", 1008);
  c.extended_l2 = true;
  RunModel(c);
}

TEST_CASE("model: extended_l2=on, 16K clusters") {
  auto c = Cfg("extl2-16k", 1009);
  c.extended_l2 = true;
  c.cluster_size = 16 * KiB;
  RunModel(c);
}

TEST_CASE("model: compat=0.10") {
  auto c = Cfg("v2", 1010);
  c.opts = {"compat=0.10"};
  RunModel(c);
}

TEST_CASE("model: lazy_refcounts=on") {
  auto c = Cfg("lazy", 1011);
  c.opts = {"lazy_refcounts=on"};
  RunModel(c);
}

TEST_CASE("model: qcow2 backing file") {
  auto c = Cfg("backing-qcow2", 1012);
  c.setup = Setup::kQcow2Backing;
  RunModel(c);
}

TEST_CASE("model: raw backing file") {
  auto c = Cfg("backing-raw", 1013);
  c.setup = Setup::kRawBacking;
  c.cluster_size = 4096;
  RunModel(c);
}

TEST_CASE("model: compat=0.10 over a qcow2 backing file") {
  // No zero flag in v2: zeroing over backing data must allocate zeroed clusters.
  auto c = Cfg("v2-backing", 1014);
  c.setup = Setup::kQcow2Backing;
  c.opts = {"compat=0.10"};
  RunModel(c);
}

TEST_CASE("model: extended_l2=on over a qcow2 backing file") {
  auto c = Cfg("extl2-backing", 1015);
  c.setup = Setup::kQcow2Backing;
  c.extended_l2 = true;
  RunModel(c);
}

TEST_CASE("model: external data_file") {
  auto c = Cfg("data-file", 1016);
  c.data_file = true;
  RunModel(c);
}

TEST_CASE("model: external data_file, data_file_raw=on") {
  auto c = Cfg("data-file-raw", 1017);
  c.data_file = true;
  c.opts = {"data_file_raw=on"};
  c.cluster_size = 4096;
  RunModel(c);
}

TEST_CASE("model: compressed, zlib") {
  auto c = Cfg("compressed-zlib", 1018);
  c.setup = Setup::kCompressed;
  c.compression = "zlib";
  RunModel(c);
}

TEST_CASE("model: compressed, zstd") {
  auto c = Cfg("compressed-zstd", 1019);
  c.setup = Setup::kCompressed;
  c.compression = "zstd";
  RunModel(c);
}

TEST_CASE("model: compressed, zlib, 4K clusters") {
  auto c = Cfg("compressed-zlib-4k", 1020);
  c.setup = Setup::kCompressed;
  c.compression = "zlib";
  c.cluster_size = 4096;
  RunModel(c);
}

TEST_CASE("model: internal snapshot") {
  auto c = Cfg("snapshot", 1021);
  c.setup = Setup::kSnapshot;
  RunModel(c);
}

TEST_CASE("model: internal snapshot, 4K clusters, refcount_bits=2") {
  // Narrow refcounts with shared clusters (refcount 2 is the maximum here).
  auto c = Cfg("snapshot-4k-rc2", 1022);
  c.setup = Setup::kSnapshot;
  c.cluster_size = 4096;
  c.opts = {"refcount_bits=2"};
  RunModel(c);
}
