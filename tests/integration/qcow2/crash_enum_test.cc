// Crash tests that enumerate, not sample (SPEC §5). A deterministic workload runs through
// Qcow2Image on RecordingDevices (tests/support/recording_device.h), which log every host
// write, zeroing, discard, resize and allocation, and every Flush (fdatasync), with data.
// Then, for the host sync points of the log (all of them with QCOWFS_CRASH_EXHAUSTIVE=1;
// in CI, every point around a new refcount block, refcount table or L1 table or a header
// write, plus up to kEvenPoints evenly spaced ones), the host image is materialised as
//   - a process kill at that fdatasync (everything issued before it persists), and
//   - a power loss there (what the previous fdatasync made durable, plus no pending op,
//     seeded random subsets of them and, exhaustive or at small points, all but one),
// and each distinct image is checked:
//   1. `qemu-img check` exits 0 or 3 (leaks), never 2. (While the dirty bit is set, with
//      lazy refcounts, refcount errors are the crashed state the next open repairs: only
//      they are allowed.)
//   2. Qcow2Image opens it writable (a lazy-refcount image rebuilds its refcounts) and
//      every byte a completed guest Flush acknowledged reads back; a byte an
//      unacknowledged op touched reads as before it or as one of those ops left it.
//   3. More writes, Flush, Close: `qemu-img check` exits 0 or 3 again, and qemu-img
//      reads back exactly what we read plus the new writes.
// The cases cover new L2 tables and refcount blocks, refcount-table growth and relocation,
// L1 growth, snapshot COW, compressed rewrites, discard and reuse, lazy refcounts, zero
// clusters and subclusters, and external data files, for 512 B to 2 MiB clusters and
// refcount_bits 1, 16 and 64. Each case prints how many points and images it checked.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "qcow2/image.h"
#include "support/ack_model.h"
#include "support/crash_check.h"
#include "support/must.h"
#include "support/process.h"
#include "support/qcow2_layout.h"
#include "support/recording_device.h"
#include "support/temp_dir.h"
#include "util/log.h"

namespace qcowfs::qcow2 {
namespace {

using testing::AckModel;
using testing::CrashStates;
using testing::HostLog;
using testing::HostOp;
using testing::MemDevice;
using testing::RecordingDevice;
using testing::TempDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;
constexpr size_t kEvenPoints = 40;     // CI: evenly spaced points per case
constexpr size_t kMaxAround = 48;      // CI: at most this many points around structural steps
constexpr int kMaxFailureReports = 3;  // detailed failure messages per case

bool EnvIs1(const char* name) {
  const char* e = getenv(name);
  return e != nullptr && std::string(e) == "1";
}
bool Exhaustive() { return EnvIs1("QCOWFS_CRASH_EXHAUSTIVE"); }
// QCOWFS_CRASH_VERBOSE=1 prints every checked point with what the ops before it wrote.
bool Verbose() { return EnvIs1("QCOWFS_CRASH_VERBOSE"); }

enum class Setup {
  kData,        // qemu-io writes some data
  kSnapshot,    // data, then `qemu-img snapshot -c` (every cluster shared: COW)
  kCompressed,  // data and compressed clusters (`write -c`)
};

struct EnumCase {
  const char* name;
  uint64_t cluster_size;
  int refcount_bits;
  uint64_t size;          // guest size at create
  const char* opts = "";  // more -o options (lazy_refcounts=on, extended_l2=on, ...)
  Setup setup = Setup::kData;
  uint64_t prefill = 0;    // bytes qemu-io writes first (moves the host file toward a boundary)
  bool data_file = false;  // -o data_file=<dir>/img.data
  bool data_file_raw = false;
  bool resize = false;  // double the guest mid-workload (L1 growth)
  int rounds = 4;       // workload rounds (writes, discard + reuse, zeroing, rewrites)
  int burst = 6;        // allocating writes per round (a Flush after every second)
  uint64_t max_write = 64 * KiB;
  uint64_t cache_size = 64 * KiB;  // engine caches: small, so dirty L2 tables get evicted
};

// ---- files ---------------------------------------------------------------------------

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE_MESSAGE(f.good(), "cannot write " << path);
}

// Reads a whole file into *b (a reused buffer: big fresh allocations cost page faults).
void ReadFileInto(const std::string& path, std::vector<uint8_t>* b) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  b->resize(static_cast<size_t>(f.tellg()));
  f.seekg(0);
  f.read(reinterpret_cast<char*>(b->data()), static_cast<std::streamsize>(b->size()));
  REQUIRE_MESSAGE(f.good(), "cannot read " << path);
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::vector<uint8_t> b;
  ReadFileInto(path, &b);
  return b;
}

// A 64-bit hash of b, mixed into h (to tell crash images apart).
uint64_t Hash(const std::vector<uint8_t>& b, uint64_t h) {
  size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, &b[i], 8);
    h = (h ^ w) * 0x9e3779b97f4a7c15ull;
    h ^= h >> 29;
  }
  for (; i < b.size(); i++) h = (h ^ b[i]) * 1099511628211ull;
  return (h ^ b.size()) * 0x9e3779b97f4a7c15ull;
}

// Logs errors only while it lives, then restores the level it found.
class QuietLog {
 public:
  QuietLog() {
    for (LogLevel l : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError}) {
      if (LogEnabled(l)) {
        saved_ = l;
        break;
      }
    }
    SetLogLevel(LogLevel::kError);
  }
  ~QuietLog() { SetLogLevel(saved_); }

 private:
  LogLevel saved_ = LogLevel::kError;
};

// ---- one case ------------------------------------------------------------------------

struct Stats {
  size_t points = 0;      // sync points in the log (+1 for trailing ops)
  size_t structural = 0;  // points whose writes put a new refblock/reftable/L1 or a header
  uint8_t kinds = 0, new_kinds = 0;  // metadata written (new) before any point
  size_t checked_points = 0;
  size_t images = 0;       // distinct crash images checked
  size_t duplicates = 0;   // crash images equal to one already checked
  size_t dirty = 0;        // images with the dirty bit set (lazy refcounts, before the rebuild)
  size_t leaks = 0;        // qemu-img check exit 3 before the reopen
  size_t leaks_after = 0;  // ... and after it
  size_t failed = 0;
  std::vector<std::string> failed_points;
};

// What the ops before one sync point wrote.
struct PointInfo {
  uint8_t kinds = 0;      // MetaKind bits of the host clusters written
  uint8_t new_kinds = 0;  // of those, clusters that were not metadata before
  size_t ops = 0;         // host ops since the previous sync
  bool Structural() const {
    return (new_kinds & (testing::kMetaRefblock | testing::kMetaReftable | testing::kMetaL1)) ||
           (kinds & testing::kMetaHeader);
  }
  std::string Describe() const {
    std::string s = std::to_string(ops) + " host ops";
    if (kinds) s += ", writing " + testing::MetaKindNames(kinds);
    if (new_kinds) s += " (new " + testing::MetaKindNames(new_kinds) + ")";
    return s;
  }
};

class EnumRunner {
 public:
  explicit EnumRunner(const EnumCase& c)
      : c_(c),
        dir_("qcowfs-crash-enum", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : ""),
        img_(dir_.File("img.qcow2")),
        data_(dir_.File("img.data")) {}

  void Run() {
    QuietLog quiet;  // every reopen of a lazy image warns that it rebuilds the refcounts
    testing::RequireTool("qemu-img");
    testing::RequireTool("qemu-io");
    BuildImage();
    RunWorkload();
    Enumerate();
    Report();
  }

 private:
  // ---- the image and the workload

  void BuildImage() {
    std::string o = "cluster_size=" + std::to_string(c_.cluster_size) +
                    ",refcount_bits=" + std::to_string(c_.refcount_bits);
    if (*c_.opts) o += std::string(",") + c_.opts;
    // An absolute data-file name: qemu-img and the reopen find the materialised file.
    if (c_.data_file) o += ",data_file=" + data_ + (c_.data_file_raw ? ",data_file_raw=on" : "");
    testing::Must(
        {"qemu-img", "create", "-q", "-f", "qcow2", "-o", o, img_, std::to_string(c_.size)});
    const uint64_t cs = c_.cluster_size, n = c_.size;
    auto s = [](uint64_t v) { return std::to_string(v); };
    std::vector<std::string> io = {"write -P 0x5a 0 " + s(c_.prefill ? c_.prefill : 4 * cs),
                                   "write -P 0x5b " + s(n / 2 + 512) + " " + s(3 * cs),
                                   "write -z " + s(n / 2 + 4 * cs) + " " + s(2 * cs)};
    if (c_.setup == Setup::kCompressed) {
      io.push_back("write -c -P 0x33 " + s(n / 4) + " " + s(8 * cs));
      io.push_back("write -c -P 0x34 " + s(3 * n / 4) + " " + s(2 * cs));
    }
    QemuIo(io);
    if (c_.setup == Setup::kSnapshot) {
      testing::Must({"qemu-img", "snapshot", "-c", "s1", img_});
      QemuIo({"write -P 0x6c " + s(n / 2) + " " + s(cs)});  // diverge a little
    }
    // The guest as qemu reads it is the model's starting point.
    std::string raw = dir_.File("initial.raw");
    testing::Must({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", img_, raw});
    initial_ = ReadFile(raw);
    std::remove(raw.c_str());
    REQUIRE(initial_.size() == c_.size);
  }

  void QemuIo(const std::vector<std::string>& cmds) {
    std::vector<std::string> argv = {"qemu-io", "-f", "qcow2"};
    for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
    argv.push_back(img_);
    testing::Must(argv);
  }

  static std::unique_ptr<MemDevice> LoadDevice(const std::string& path) {
    std::vector<uint8_t> b = ReadFile(path);
    auto d = std::make_unique<MemDevice>();
    REQUIRE(d->Write(0, b.data(), b.size()).ok());
    return d;
  }

  void RunWorkload() {
    RecordingDevice host(&log_, *LoadDevice(img_));
    std::unique_ptr<RecordingDevice> data;
    if (c_.data_file) data = std::make_unique<RecordingDevice>(&log_, *LoadDevice(data_));
    model_ = std::make_unique<AckModel>(initial_);
    OpenDevices d;
    d.host = &host;
    d.data_file = data.get();
    d.name = std::string("enum-") + c_.name;
    OpenOptions o;
    o.lock = false;
    o.cache_size = c_.cache_size;
    auto r = Qcow2Image::OpenOn(d, o);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    std::unique_ptr<Qcow2Image> img = std::move(r).value();
    AckModel& m = *model_;
    std::mt19937_64 rng(std::hash<std::string_view>()(c_.name));
    const uint64_t cs = c_.cluster_size;
    uint64_t size = c_.size;
    auto write = [&](uint64_t off, uint64_t len) {
      const std::vector<uint8_t>& b = m.Write(off, len, log_.size());
      Status st = img->Write(off, b.data(), len);
      REQUIRE_MESSAGE(st.ok(), "write " << off << "+" << len << ": " << st.ToString());
    };
    auto zero = [&](uint64_t off, uint64_t len, int how) {  // 0: discard, 1: zero, 2: zero+unmap
      m.Zero(off, len, log_.size());
      Status st = how == 0 ? img->Discard(off, len) : img->WriteZeroes(off, len, how == 2);
      REQUIRE_MESSAGE(st.ok(), "zero/discard " << off << "+" << len << ": " << st.ToString());
    };
    auto flush = [&] {
      Status st = img->Flush();
      REQUIRE_MESSAGE(st.ok(), st.ToString());
      m.FlushReturned(log_.size());
    };
    auto pick_len = [&]() -> uint64_t {
      switch (rng() % 4) {
        case 0:
          return 1 + rng() % std::min<uint64_t>(cs, 3000);  // part of a cluster
        case 1:
          return cs * (1 + rng() % 2);  // whole clusters
        case 2:
          return 512 * (1 + rng() % 8);  // sectors
        default:
          return 1 + rng() % c_.max_write;  // anything
      }
    };
    auto pick_off = [&](uint64_t len, uint64_t lo, uint64_t hi) {
      uint64_t off = lo + rng() % (hi - lo - len + 1);
      if (rng() % 2) off = std::max(lo, off & ~(cs - 1));
      return off;
    };
    std::vector<std::pair<uint64_t, uint64_t>> written;
    const uint64_t sub =
        std::string(c_.opts).find("extended_l2=on") != std::string::npos ? cs / 32 : cs;
    for (int round = 0; round < c_.rounds; round++) {
      // Allocating writes all over the guest (new L2 tables, refcount blocks).
      for (int i = 0; i < c_.burst; i++) {
        uint64_t len = std::min(pick_len(), size / 4);
        uint64_t off = pick_off(len, 0, size);
        if (i % 2 == 1) {  // next to an earlier write: new clusters in an existing L2 table
          auto [o, l] = written[written.size() - 1 - rng() % std::min<size_t>(written.size(), 4)];
          off = std::min(size - len, o + l + (rng() % 2) * cs);
        }
        write(off, len);
        written.emplace_back(off, len);
        if (i % 2 == 1) flush();
      }
      // Discard whole clusters of earlier writes, then writes that reuse the freed space.
      for (int i = 0; i < 2; i++) {
        auto [off, len] = written[rng() % written.size()];
        uint64_t a = off & ~(cs - 1), b = std::min(size, (off + len + cs - 1) & ~(cs - 1));
        zero(a, b - a, 0);
      }
      flush();
      for (int i = 0; i < 2; i++) write(pick_off(2 * cs, 0, size), 2 * cs);
      flush();
      // Zeroing: whole clusters (with and without unmap), a partial range, subclusters.
      zero(pick_off(cs, 0, size) & ~(cs - 1), cs, 1 + static_cast<int>(rng() % 2));
      zero(pick_off(700, 0, size), 1 + rng() % 700, 1);
      if (sub != cs) {
        uint64_t base = pick_off(cs, 0, size) & ~(cs - 1);
        write(base + sub * (rng() % 32), sub);
        zero(base + sub * (rng() % 31), 2 * sub, 1);
      }
      flush();
      // Rewrites of what the setup wrote (snapshot COW, compressed clusters, zero clusters).
      write(c_.size / 4 + cs / 2 + round * cs, 1 + rng() % cs);
      write(c_.size / 2 + (rng() % 4) * cs, cs);
      if (c_.setup == Setup::kCompressed) write(3 * c_.size / 4 + (round % 2) * cs, cs);
      flush();
      if (c_.resize && round == c_.rounds / 2) {
        uint64_t old = size;
        size *= 2;
        m.Resize(size, log_.size());
        Status st = img->Resize(size);
        REQUIRE_MESSAGE(st.ok(), st.ToString());
        write(old + 3 * cs, 2 * cs);
        write(size - cs, cs);
        flush();
      }
    }
    // The live image agrees with the model before the crash points are looked at.
    std::vector<uint8_t> got(size);
    REQUIRE(img->Read(0, got.data(), size).ok());
    REQUIRE_MESSAGE(std::memcmp(got.data(), m.current().data(), size) == 0,
                    "live read differs from the model");
    Status st = img->Close();
    REQUIRE_MESSAGE(st.ok(), st.ToString());
    m.FlushReturned(log_.size());
  }

  // ---- crash points

  // Classifies the ops before every sync point by the metadata they wrote.
  std::vector<PointInfo> Classify(size_t npoints) {
    std::vector<testing::Qcow2Layout> lay(npoints + 1);
    {
      MemDevice init;
      init.CopyFrom(log_.initial(0));
      lay[0] = testing::ReadQcow2Layout(&init);
    }
    std::vector<std::unique_ptr<MemDevice>> st;
    CrashStates states(log_);
    for (size_t k = 1; k <= npoints; k++) {
      states.Materialise(k, std::vector<bool>(states.Pending(k).size(), true), &st);
      lay[k] = testing::ReadQcow2Layout(st[0].get());
    }
    std::map<uint64_t, uint8_t> ever;  // cluster -> every kind it had at some point
    for (const auto& l : lay)
      for (auto [c, kind] : l.clusters) ever[c] |= kind;
    const uint64_t cs = c_.cluster_size;
    std::vector<PointInfo> info(npoints + 1);
    const auto& ops = log_.ops();
    for (size_t k = 1; k <= npoints; k++) {
      size_t from = k == 1 ? 0 : log_.SyncPos(k - 1) + 1;
      for (size_t i = from; i < log_.SyncPos(k); i++) {
        const HostOp& op = ops[i];
        info[k].ops++;
        if (op.device != 0 || op.kind == HostOp::kFlush || op.kind == HostOp::kResize ||
            op.len == 0)
          continue;
        for (uint64_t c = op.offset / cs; c <= (op.offset + op.len - 1) / cs; c++) {
          auto it = ever.find(c);
          if (it == ever.end()) continue;
          info[k].kinds |= it->second;
          info[k].new_kinds |= it->second & ~lay[k - 1].KindOf(c) & ~testing::kMetaHeader;
        }
      }
    }
    return info;
  }

  std::vector<size_t> Select(const std::vector<PointInfo>& info, size_t npoints) {
    std::vector<size_t> all;
    for (size_t k = 1; k <= npoints; k++) all.push_back(k);
    if (Exhaustive()) return all;
    // Around each structural step: its point and the next two (the rest of that flush).
    std::vector<size_t> around;
    for (size_t k = 1; k <= npoints; k++)
      if (info[k].Structural())
        for (size_t j = k; j <= std::min(npoints, k + 2); j++)
          if (around.empty() || around.back() < j) around.push_back(j);
    std::set<size_t> pick;
    for (size_t i = 0; i < around.size(); i++)
      if (around.size() <= kMaxAround ||
          i * kMaxAround / around.size() != (i + 1) * kMaxAround / around.size())
        pick.insert(around[i]);
    for (size_t i = 0; i < kEvenPoints && npoints > 0; i++)
      pick.insert(1 + i * (npoints - 1) / (kEvenPoints - 1));
    pick.insert(npoints);
    return std::vector<size_t>(pick.begin(), pick.end());
  }

  // The subsets of the pending ops to try at one point: first the process kill (all).
  std::vector<std::pair<std::string, std::vector<bool>>> Variants(size_t k, size_t n,
                                                                  bool small_point) {
    std::vector<std::pair<std::string, std::vector<bool>>> v;
    v.emplace_back("process kill", std::vector<bool>(n, true));
    if (n == 0) return v;
    v.emplace_back("power loss, none of " + std::to_string(n) + " pending ops",
                   std::vector<bool>(n, false));
    const bool ex = Exhaustive();
    if (n >= 2) {
      std::mt19937_64 rng(std::hash<std::string_view>()(c_.name) * 1000003 + k);
      for (int r = 0; r < (ex ? 4 : 1); r++) {
        std::vector<bool> keep(n);
        size_t kept = 0;
        for (size_t i = 0; i < n; i++) kept += keep[i] = rng() % 2;
        v.emplace_back("power loss, random subset " + std::to_string(r) + " (" +
                           std::to_string(kept) + " of " + std::to_string(n) + " pending ops kept)",
                       keep);
      }
    }
    if (n >= 3 && (ex ? n <= 64 : (small_point && n <= 6))) {
      for (size_t j = 0; j < n; j++) {
        std::vector<bool> keep(n, true);
        keep[j] = false;
        v.emplace_back(
            "power loss, all pending ops but #" + std::to_string(j) + " of " + std::to_string(n),
            keep);
      }
    }
    return v;
  }

  void Enumerate() {
    size_t npoints = log_.syncs();
    if (log_.SyncPos(npoints) + 1 < log_.ops().size()) npoints++;  // ops after the last sync
    stats_.points = npoints;
    std::vector<PointInfo> info = Classify(npoints);
    for (size_t k = 1; k <= npoints; k++) {
      stats_.structural += info[k].Structural();
      stats_.kinds |= info[k].kinds;
      stats_.new_kinds |= info[k].new_kinds;
    }
    std::set<std::pair<uint64_t, size_t>> seen;
    CrashStates states(log_);
    std::vector<std::unique_ptr<MemDevice>> st;
    for (size_t k : Select(info, npoints)) {
      stats_.checked_points++;
      const size_t pos = log_.SyncPos(k);
      model_->CrashAt(pos);
      const std::vector<size_t> pending = states.Pending(k);
      if (Verbose())
        printf("%s point %zu/%zu (host op %zu): %s; %zu pending\n", c_.name, k, npoints, pos,
               info[k].Describe().c_str(), pending.size());
      for (auto& [what, keep] : Variants(k, pending.size(), info[k].Structural())) {
        states.Materialise(k, keep, &st);
        files_.resize(st.size());
        uint64_t h = 1469598103934665603ull;
        for (size_t d = 0; d < st.size(); d++) {
          files_[d].resize(st[d]->Size());
          REQUIRE(st[d]->Read(0, files_[d].data(), files_[d].size()).ok());
          h = Hash(files_[d], h);
        }
        if (!seen.emplace(h, model_->acked_ops() * 1000003 + model_->unacked_ops()).second) {
          stats_.duplicates++;
          continue;
        }
        stats_.images++;
        std::string why = CheckImage(files_);
        if (why.empty()) continue;
        stats_.failed++;
        std::string where = std::string(c_.name) + " sync point " + std::to_string(k) + "/" +
                            std::to_string(npoints) + " (host op " + std::to_string(pos) + "), " +
                            what;
        stats_.failed_points.push_back(std::to_string(k) + " " + what);
        if (stats_.failed <= kMaxFailureReports)
          FAIL_CHECK("crash at " << where << "\n  ops before this sync: " << info[k].Describe()
                                 << "\n  ops before the previous sync: "
                                 << (k > 1 ? info[k - 1].Describe() : "-")
                                 << "\n  guest ops acknowledged: " << model_->acked_ops()
                                 << ", unacknowledged that may have landed: "
                                 << model_->unacked_ops() << "\n"
                                 << why);
      }
    }
  }

  // Checks one crash image (files[0]: host, files[1]: data file); "" when it passes.
  std::string CheckImage(const std::vector<std::vector<uint8_t>>& files) {
    const std::vector<uint8_t>& host = files[0];
    WriteFile(img_, host);
    if (files.size() > 1) WriteFile(data_, files[1]);
    const bool dirty = testing::DirtyBit(host.data(), host.size());
    const bool lazy = std::string(c_.opts).find("lazy_refcounts=on") != std::string::npos;
    if (dirty) {
      stats_.dirty++;
      if (!lazy) return "dirty bit set without lazy refcounts";
    }
    if (std::string why = QemuCheck("before reopen", false, dirty, false); !why.empty()) return why;
    OpenOptions o;
    o.lock = false;
    auto r = Qcow2Image::Open(img_, o);
    if (!r.ok()) return "reopen failed: " + r.status().ToString();
    std::unique_ptr<Qcow2Image> img = std::move(r).value();
    const uint64_t size = img->Size();
    std::vector<uint8_t>& got = got_;
    got.resize(size);
    if (Status s = img->Read(0, got.data(), size); !s.ok())
      return "read after reopen: " + s.ToString();
    if (std::string why = model_->Check(got.data(), size); !why.empty())
      return "after reopen: " + why;
    const uint64_t cs = c_.cluster_size;
    const std::pair<uint64_t, uint64_t> more[] = {{0, std::min(size, cs / 2 + 100)},
                                                  {size / 2 + cs + 7, std::min<uint64_t>(cs, 5000)},
                                                  {size - 2 * cs, 2 * cs}};
    for (int j = 0; j < 3; j++) {
      auto [off, len] = more[j];
      std::memset(&got[off], 0xe0 + j, len);
      if (Status s = img->Write(off, &got[off], len); !s.ok())
        return "write after reopen: " + s.ToString();
    }
    if (Status s = img->Flush(); !s.ok()) return "flush after reopen: " + s.ToString();
    if (Status s = img->Close(); !s.ok()) return "close after reopen: " + s.ToString();
    img.reset();
    // A dirty image had its refcounts rebuilt: exact, so no leaks either.
    if (std::string why = QemuCheck("after reopen, writes and close", true, false, dirty);
        !why.empty())
      return why;
    std::string raw = dir_.File("check.raw");
    testing::CmdResult cv =
        testing::RunCommand({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", img_, raw});
    if (cv.exit_code != 0) return "qemu-img convert failed: " + cv.err;
    std::vector<uint8_t>& back = back_;
    ReadFileInto(raw, &back);
    if (back.size() != got.size())
      return "qemu-img reads " + std::to_string(back.size()) + " bytes after close";
    if (std::memcmp(back.data(), got.data(), size) == 0) return "";
    for (uint64_t i = 0; i < size; i++)
      if (back[i] != got[i])
        return "after reopen, writes and close qemu-img reads guest byte " + std::to_string(i) +
               " as " + std::to_string(back[i]) + ", expected " + std::to_string(got[i]);
    return "";
  }

  // `qemu-img check` on the image; "" when it passes (testing::CrashCheckPasses).
  std::string QemuCheck(const char* when, bool after, bool dirty, bool rebuilt) {
    testing::ImageCheck r = testing::QemuImgCheck(img_);
    if (r.exit_code == 3) (after ? stats_.leaks_after : stats_.leaks)++;
    if (testing::CrashCheckPasses(r, !rebuilt, dirty)) return "";
    return testing::DescribeCheck(r, std::string(when) + (dirty ? " (dirty bit set)" : ""));
  }

  void Report() {
    const Stats& s = stats_;
    MESSAGE("crash enum " << std::string(c_.name)
                          << std::string(Exhaustive() ? " (exhaustive)" : "") << ": " << s.points
                          << " sync points (" << s.structural << " structural), "
                          << s.checked_points << " checked, " << s.images << " crash images ("
                          << s.duplicates << " duplicates skipped, " << s.dirty
                          << " dirty; qemu-img check found leaks in " << s.leaks << " before and "
                          << s.leaks_after << " after the reopen), " << s.failed
                          << " failed; metadata written: " << testing::MetaKindNames(s.kinds)
                          << ", new: " << testing::MetaKindNames(s.new_kinds));
    if (s.failed > 0) {
      std::string list;
      for (const auto& p : s.failed_points) list += "\n  " + p;
      FAIL_CHECK(std::string(c_.name) << ": " << s.failed << " crash images failed:" << list);
    }
  }

  EnumCase c_;
  TempDir dir_;
  std::string img_, data_;
  std::vector<uint8_t> initial_;
  HostLog log_;
  std::unique_ptr<AckModel> model_;
  Stats stats_;
  // Scratch buffers reused for every crash image.
  std::vector<std::vector<uint8_t>> files_;
  std::vector<uint8_t> got_, back_;
};

void RunCase(const EnumCase& c) { EnumRunner(c).Run(); }

// The cases: what each sets beyond the defaults of EnumCase.
// c512-rc64: a refcount block covers 64 clusters and the first refcount-table cluster 4096,
// so new refcount blocks come every few writes, and the table moves once the file passes
// 2 MiB (the prefill brings it close); the resize moves the L1 table.
// c4k-rc16-snapshot: data up to just below 8 MiB of host file, so the COW copies need the
// second refcount block.
// clang-format off
const EnumCase kC512Rc64{.name = "c512-rc64", .cluster_size = 512, .refcount_bits = 64, .size = 4 * MiB,
                         .prefill = 1900 * KiB, .resize = true, .rounds = 6, .burst = 10, .max_write = 24 * KiB};
const EnumCase kC4kSnapshot{.name = "c4k-rc16-snapshot", .cluster_size = 4 * KiB, .refcount_bits = 16,
                            .size = 16 * MiB, .setup = Setup::kSnapshot, .prefill = 8 * MiB - 160 * KiB};
const EnumCase kC4kCompressed{.name = "c4k-rc16-compressed", .cluster_size = 4 * KiB, .refcount_bits = 16,
                              .size = 8 * MiB, .setup = Setup::kCompressed};
const EnumCase kC64kRc1{.name = "c64k-rc1", .cluster_size = 64 * KiB, .refcount_bits = 1, .size = 16 * MiB,
                        .rounds = 5, .max_write = 256 * KiB};
const EnumCase kC64kExtL2{.name = "c64k-extl2", .cluster_size = 64 * KiB, .refcount_bits = 16, .size = 16 * MiB,
                          .opts = "extended_l2=on", .max_write = 256 * KiB};
const EnumCase kC4kLazy{.name = "c4k-lazy", .cluster_size = 4 * KiB, .refcount_bits = 16, .size = 8 * MiB,
                        .opts = "lazy_refcounts=on", .resize = true};
const EnumCase kC512Lazy{.name = "c512-rc16-lazy", .cluster_size = 512, .refcount_bits = 16, .size = 2 * MiB,
                         .opts = "lazy_refcounts=on", .max_write = 16 * KiB};
const EnumCase kC4kDataFile{.name = "c4k-datafile", .cluster_size = 4 * KiB, .refcount_bits = 16,
                            .size = 8 * MiB, .data_file = true};
const EnumCase kC4kDataFileRaw{.name = "c4k-datafile-raw", .cluster_size = 4 * KiB, .refcount_bits = 16,
                               .size = 8 * MiB, .data_file = true, .data_file_raw = true};
const EnumCase kC2m{.name = "c2m-rc16", .cluster_size = 2 * MiB, .refcount_bits = 16, .size = 32 * MiB,
                    .rounds = 2, .max_write = 3 * MiB};

TEST_CASE("crash enum: c512-rc64 (new refblocks; reftable growth and move; L1 growth)") { RunCase(kC512Rc64); }
TEST_CASE("crash enum: c4k-rc16-snapshot (snapshot COW; a new refblock)") { RunCase(kC4kSnapshot); }
TEST_CASE("crash enum: c4k-rc16-compressed (compressed rewrites)") { RunCase(kC4kCompressed); }
TEST_CASE("crash enum: c64k-rc1 (discard and reuse)") { RunCase(kC64kRc1); }
TEST_CASE("crash enum: c64k-extl2 (zero clusters and subclusters)") { RunCase(kC64kExtL2); }
TEST_CASE("crash enum: c4k-lazy (lazy refcounts; repair at reopen; L1 growth)") { RunCase(kC4kLazy); }
TEST_CASE("crash enum: c512-rc16-lazy (lazy refcounts; many refblocks)") { RunCase(kC512Lazy); }
TEST_CASE("crash enum: c4k-datafile (external data file)") { RunCase(kC4kDataFile); }
TEST_CASE("crash enum: c4k-datafile-raw (external data file; data_file_raw=on)") { RunCase(kC4kDataFileRaw); }
TEST_CASE("crash enum: c2m-rc16 (2 MiB clusters)") { RunCase(kC2m); }
// clang-format on

}  // namespace
}  // namespace qcowfs::qcow2
