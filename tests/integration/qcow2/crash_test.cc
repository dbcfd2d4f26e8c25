// Crash simulation (SPEC §5): random guest I/O on an image whose host device models a
// volatile write cache, then a simulated power cut at a random moment (between requests or
// in the middle of one), reopen, and check that
//   - `qemu-img check` finds no corruption (leaks allowed: exit 0 or 3), and
//   - every byte as of the last completed Flush reads back unchanged, unless a later
//     request touched it (then any value one of those requests or the flushed state gave
//     it is allowed).
// Runs for several image layouts; fixed seeds, and seed + combo are printed on failure.
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "qcow2/create.h"
#include "qcow2/image.h"
#include "support/fault_injection_device.h"
#include "support/mem_device.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::qcow2 {
namespace {

using testing::FaultInjectionDevice;
using testing::MemDevice;
using testing::TempDir;

struct Combo {
  const char* name;
  uint32_t cluster_bits = 16;
  uint32_t version = 3;
  uint32_t refcount_order = 4;
  bool lazy = false;
  bool extended_l2 = false;
  bool backing = false;
  bool data_file = false;
  uint64_t size = 2ull << 20;
};

constexpr int kItersPerCombo = 100;
constexpr int kMaxOps = 60;

// Value written by op `op` at guest offset `off` (depends on both, so misplaced data shows).
inline uint8_t Val(int op, uint64_t off) {
  return static_cast<uint8_t>(op * 37 + (off >> 9) * 11 + (off & 511) * 3 + 1);
}

struct OpRec {
  enum Kind { kWrite, kZero } kind;  // kZero: WriteZeroes or Discard (reads zeros after)
  uint64_t off, len;
};

// Guest-visible expectations: `flushed` is the state as of the last completed Flush,
// `since_flush` the requests issued after it. After a crash byte i may read flushed[i], or
// the value any request in since_flush that covers i gave it (none: exactly flushed[i]).
// (No per-byte bookkeeping: RunCommand forks, and every page written after a fork takes a
// copy-on-write fault, so big per-byte tables cost more than the checks.)
struct Model {
  std::vector<uint8_t> flushed;
  std::vector<uint8_t> current;  // what a live read must return
  std::vector<OpRec> ops;        // indexed by op number
  std::vector<int> since_flush;  // op numbers issued after the last completed Flush

  void Reset(const std::vector<uint8_t>& initial) {
    ops.clear();
    since_flush.clear();
    current = initial;
    flushed = initial;
  }
  void Touch(int op, const OpRec& r) {
    if (r.kind == OpRec::kWrite) {
      for (uint64_t i = r.off; i < r.off + r.len; i++) current[i] = Val(op, i);
    } else {
      std::memset(&current[r.off], 0, r.len);
    }
    since_flush.push_back(op);
  }
  void Flushed() {
    for (int op : since_flush) {
      const OpRec& r = ops[op];
      std::memcpy(&flushed[r.off], &current[r.off], r.len);
    }
    since_flush.clear();
  }
  bool Allowed(uint64_t i, uint8_t v) const {
    if (v == flushed[i]) return true;
    for (int op : since_flush) {
      const OpRec& r = ops[op];
      if (i < r.off || i >= r.off + r.len) continue;
      if (v == (r.kind == OpRec::kWrite ? Val(op, i) : 0)) return true;
    }
    return false;
  }
  // Requests since the last flush that cover byte i, for messages.
  std::string TouchedBy(uint64_t i) const {
    std::string out;
    for (int op : since_flush) {
      const OpRec& r = ops[op];
      if (i >= r.off && i < r.off + r.len)
        out += " op" + std::to_string(op) + (r.kind == OpRec::kWrite ? "(write " : "(zero ") +
               std::to_string(r.off) + "+" + std::to_string(r.len) + ")";
    }
    return out.empty() ? " none" : out;
  }
};

void DumpToFile(const std::vector<uint8_t>& bytes, const std::string& path) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE_MESSAGE(f.good(), "cannot write " << path);
}

struct Stats {
  int iterations = 0;
  int mid_op_crashes = 0;
  int drop_all = 0;
  int leaks = 0;
  long ops = 0;
  long flushes = 0;
};

class CrashRunner {
 public:
  explicit CrashRunner(const Combo& c) : combo_(c), dir_("qcowfs-crash") {
    if (combo_.backing) MakeBase();
  }

  // One iteration; returns false (after reporting) on failure.
  bool Run(uint64_t seed, bool drop_all, Stats* st) {
    std::mt19937_64 rng(seed);
    std::string where = std::string("combo=") + combo_.name + " seed=" + std::to_string(seed) +
                        " drop_all=" + (drop_all ? "1" : "0");
    INFO(where);
    const uint64_t size = combo_.size;

    FaultInjectionDevice host;
    std::unique_ptr<FaultInjectionDevice> data;
    if (combo_.data_file) data = std::make_unique<FaultInjectionDevice>();
    {
      CreateOptions co;
      co.size = size;
      co.cluster_bits = combo_.cluster_bits;
      co.version = combo_.version;
      co.refcount_order = combo_.refcount_order;
      co.lazy_refcounts = combo_.lazy;
      co.extended_l2 = combo_.extended_l2;
      if (combo_.backing) {
        co.backing_file = "base.qcow2";
        co.backing_format = "qcow2";
      }
      // qemu-img resolves a relative data-file name against its working directory, not
      // the image's; store an absolute name so that check finds the dump.
      if (combo_.data_file) co.data_file = dir_.File("data.raw");
      Status s = CreateOn(&host, co);
      REQUIRE_MESSAGE(s.ok(), s.ToString());
    }

    Model& m = model_;
    if (zeros_.size() != size) zeros_.assign(size, 0);
    m.Reset(combo_.backing ? base_guest_ : zeros_);

    // Mid-request crash: the devices start failing after a random number of mutating calls
    // (and nothing reaches them afterwards). Otherwise the crash comes between requests.
    const bool mid_op = rng() % 2 == 0;
    const int nops = 20 + static_cast<int>(rng() % (kMaxOps - 20 + 1));
    const int crash_after_op = static_cast<int>(rng() % (nops + 1));
    if (mid_op) {
      host.FailWritesAfter(static_cast<int>(rng() % 150));
      if (data) data->FailWritesAfter(static_cast<int>(rng() % 150));
    }

    auto img = Open(&host, data.get());
    if (!img) return false;
    bool failed = false;
    for (int op = 0; op < nops && !failed; op++) {
      if (!mid_op && op == crash_after_op) break;
      OpRec r = RandomRange(&rng, size);
      int kind = static_cast<int>(rng() % 100);
      Status s;
      st->ops++;
      if (kind < 50) {
        r.kind = OpRec::kWrite;
        m.ops.push_back(r);
        std::vector<uint8_t>& buf = buf_;
        buf.resize(r.len);
        for (uint64_t i = 0; i < r.len; i++) buf[i] = Val(op, r.off + i);
        m.Touch(op, r);
        s = img->Write(r.off, buf.data(), r.len);
      } else if (kind < 65) {
        r.kind = OpRec::kZero;
        m.ops.push_back(r);
        m.Touch(op, r);
        s = img->WriteZeroes(r.off, r.len, rng() % 2);
      } else if (kind < 80) {
        r.kind = OpRec::kZero;
        m.ops.push_back(r);
        m.Touch(op, r);
        s = img->Discard(r.off, r.len);
      } else if (kind < 93) {
        m.ops.push_back(OpRec{OpRec::kWrite, 0, 0});
        s = img->Flush();
        if (s.ok()) {
          m.Flushed();
          st->flushes++;
        }
      } else {
        m.ops.push_back(OpRec{OpRec::kWrite, 0, 0});
        std::vector<uint8_t>& buf = buf_;
        buf.resize(r.len);
        s = img->Read(r.off, buf.data(), r.len);
        if (s.ok() && std::memcmp(buf.data(), &m.current[r.off], r.len) != 0) {
          FAIL_CHECK("live read before the crash differs from the model at guest offset " << r.off);
          return false;
        }
      }
      if (!s.ok()) {
        if (!mid_op) {
          FAIL_CHECK("op " << op << " failed without an injected fault: " << s.ToString());
          return false;
        }
        failed = true;  // the power went out during this request
      }
    }
    if (failed) st->mid_op_crashes++;

    // Power cut: nothing more reaches the devices (the destructor's close fails), then the
    // volatile caches are lost in whole or in part.
    host.FailWritesAfter(0);
    if (data) data->FailWritesAfter(0);
    (void)img->Close();  // fails: nothing reaches the devices (and the destructor stays quiet)
    img.reset();
    host.Crash(&rng, drop_all);
    if (data) data->Crash(&rng, drop_all);
    host.FailWritesAfter(-1);
    if (data) data->FailWritesAfter(-1);

    // Reopen writable (lazy images rebuild their refcounts here) and verify.
    auto img2 = Open(&host, data.get());
    if (!img2) return false;
    std::vector<uint8_t>& got = got_;
    got.resize(size);
    Status rs = img2->Read(0, got.data(), size);
    if (!rs.ok()) {
      FAIL_CHECK("read after the crash failed: " << rs.ToString());
      return false;
    }
    for (uint64_t i = 0; i < size; i++) {
      if (got[i] != m.flushed[i] && !m.Allowed(i, got[i])) {
        FAIL_CHECK("after the crash guest byte " << i << " reads " << int(got[i]) << "; flushed value "
                                                 << int(m.flushed[i]) << ", written since the flush by"
                                                 << m.TouchedBy(i));
        return false;
      }
    }
    Status cs = img2->Close();
    if (!cs.ok()) {
      FAIL_CHECK("close after the crash failed: " << cs.ToString());
      return false;
    }
    img2.reset();

    // qemu-img check on the durable state.
    std::string img_path = dir_.File("img.qcow2");
    DumpDurable(&host, img_path);
    if (data) DumpDurable(data.get(), dir_.File("data.raw"));
    testing::CmdResult r = testing::RunCommand({"qemu-img", "check", "-f", "qcow2", img_path});
    if (r.exit_code != 0 && r.exit_code != 3) {
      FAIL_CHECK("qemu-img check exit " << r.exit_code << "\n" << r.out << r.err);
      return false;
    }
    if (r.exit_code == 3) st->leaks++;
    st->iterations++;
    if (drop_all) st->drop_all++;
    return true;
  }

 private:
  std::unique_ptr<Qcow2Image> Open(block::BlockDevice* host, block::BlockDevice* data) {
    OpenDevices d;
    d.host = host;
    d.data_file = data;
    d.backing = base_img_.get();
    d.name = std::string("crash-") + combo_.name;
    OpenOptions o;
    o.lock = false;
    o.cache_size = 256 * 1024;  // small caches: L2 evictions and refblock writes mid-run
    auto r = Qcow2Image::OpenOn(d, o);
    if (!r.ok()) {
      FAIL_CHECK("open failed: " << r.status().ToString());
      return nullptr;
    }
    return std::move(r).value();
  }

  // Writes the device's durable contents to path. Called after a clean Close; the extra
  // Flush makes live == durable, so the live view can be read into a reused buffer.
  void DumpDurable(FaultInjectionDevice* dev, const std::string& path) {
    REQUIRE(dev->Flush().ok());
    REQUIRE(dev->pending_ops() == 0);
    dump_.resize(dev->Size());
    REQUIRE(dev->Read(0, dump_.data(), dump_.size()).ok());
    DumpToFile(dump_, path);
  }

  OpRec RandomRange(std::mt19937_64* rng, uint64_t size) {
    const uint64_t cs = 1ull << combo_.cluster_bits;
    uint64_t len;
    switch ((*rng)() % 4) {
      case 0: len = 1 + (*rng)() % 1024; break;
      case 1: len = 512 * (1 + (*rng)() % 16); break;
      case 2: len = cs * (1 + (*rng)() % 3); break;  // whole clusters (discard frees them)
      default: len = 1 + (*rng)() % (128 * 1024); break;
    }
    len = std::min(len, size);
    uint64_t off = (*rng)() % (size - len + 1);
    switch ((*rng)() % 3) {
      case 0: off &= ~uint64_t{511}; break;
      case 1: off &= ~(cs - 1); break;
      default: break;
    }
    return OpRec{OpRec::kWrite, off, len};
  }

  // A base image with data in part of its clusters, saved next to the overlays.
  void MakeBase() {
    CreateOptions co;
    co.size = combo_.size;
    co.cluster_bits = 16;
    REQUIRE(CreateOn(&base_mem_, co).ok());
    {
      OpenDevices d;
      d.host = &base_mem_;
      d.name = "base";
      OpenOptions o;
      o.lock = false;
      auto r = Qcow2Image::OpenOn(d, o);
      REQUIRE_MESSAGE(r.ok(), r.status().ToString());
      auto base = std::move(r).value();
      base_guest_.assign(combo_.size, 0);
      std::mt19937_64 rng(4242);
      for (uint64_t off = 0; off < combo_.size; off += 32 * 1024) {
        if (rng() % 3 == 0) continue;
        for (uint64_t i = 0; i < 32 * 1024; i++) base_guest_[off + i] = static_cast<uint8_t>(0xB0 ^ ((off + i) * 13 >> 7));
        REQUIRE(base->Write(off, &base_guest_[off], 32 * 1024).ok());
      }
      REQUIRE(base->Close().ok());
    }
    DumpToFile(base_mem_.Contents(), dir_.File("base.qcow2"));
    OpenDevices d;
    d.host = &base_mem_;
    d.name = "base";
    OpenOptions o;
    o.lock = false;
    o.read_only = true;
    auto r = Qcow2Image::OpenOn(d, o);
    REQUIRE_MESSAGE(r.ok(), r.status().ToString());
    base_img_ = std::move(r).value();
  }

  Combo combo_;
  TempDir dir_;
  MemDevice base_mem_;
  std::unique_ptr<Qcow2Image> base_img_;
  std::vector<uint8_t> base_guest_;
  Model model_;
  // Scratch buffers reused across iterations (fresh multi-MiB allocations dominated).
  std::vector<uint8_t> zeros_, buf_, got_, dump_;
};

void RunCombo(const Combo& c, uint64_t seed_base) {
  testing::RequireTool("qemu-img");
  auto t0 = std::chrono::steady_clock::now();
  CrashRunner runner(c);
  Stats st;
  int failures = 0;
  for (int it = 0; it < kItersPerCombo && failures < 3; it++) {
    uint64_t seed = seed_base * 1000 + it;
    if (!runner.Run(seed, it % 2 == 0, &st)) failures++;
  }
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
  MESSAGE("crash " << std::string(c.name) << ": " << st.iterations << "/" << kItersPerCombo << " iterations passed, "
                   << st.mid_op_crashes << " crashed inside a request, " << st.drop_all
                   << " dropped all pending writes, " << st.leaks << " left leaks, " << st.ops << " ops, "
                   << st.flushes << " flushes, " << ms << " ms");
  CHECK(failures == 0);
}

TEST_CASE("crash: 64K clusters (default)") { RunCombo(Combo{.name = "default64k"}, 1); }
TEST_CASE("crash: 4K clusters") { RunCombo(Combo{.name = "cluster4k", .cluster_bits = 12}, 2); }
TEST_CASE("crash: 512-byte clusters") {
  RunCombo(Combo{.name = "cluster512", .cluster_bits = 9}, 3);
}
TEST_CASE("crash: refcount_bits=1") { RunCombo(Combo{.name = "refbits1", .refcount_order = 0}, 4); }
TEST_CASE("crash: refcount_bits=64") { RunCombo(Combo{.name = "refbits64", .refcount_order = 6}, 5); }
TEST_CASE("crash: extended L2") { RunCombo(Combo{.name = "extended_l2", .extended_l2 = true}, 6); }
TEST_CASE("crash: compat=0.10") { RunCombo(Combo{.name = "compat010", .version = 2}, 7); }
TEST_CASE("crash: lazy refcounts") { RunCombo(Combo{.name = "lazy_refcounts", .lazy = true}, 8); }
TEST_CASE("crash: backing file") { RunCombo(Combo{.name = "backing", .backing = true}, 9); }
TEST_CASE("crash: external data file") { RunCombo(Combo{.name = "data_file", .data_file = true}, 10); }

}  // namespace
}  // namespace qcowfs::qcow2
