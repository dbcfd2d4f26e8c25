// Crash points through the real mount, enumerated (SPEC §5). The daemon runs with the
// LD_PRELOAD library tests/support/sync_fault_preload.c, which SIGKILLs it at its N-th
// host fdatasync (or, in the error-path tests, fails syncs with EIO or host writes with
// ENOSPC from the N-th on). A deterministic workload (writes that need new L2 tables and
// new refcount blocks, fsync after every few) runs through the mounted file once to count
// the syncs, then once per N. After each run:
//   - the stale mount is unmounted and the daemon collected (killed: exit 137);
//   - `qemu-img check` exits 0 or 3 (with the dirty bit set, lazy refcounts: refcount
//     errors only), and every byte acknowledged by an fsync that returned reads back
//     (qemu-img convert), bytes of later writes old or new;
//   - a remount writes more and unmounts cleanly; check and contents again.
// CI runs about 14 values of N per image; QCOWFS_CRASH_EXHAUSTIVE=1 (or QCOWFS_LONG=1)
// every sync of the workload and its unmount.
#include <doctest/doctest.h>

#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "integration/stress/sync_fault.h"
#include "integration/mount/mount_guard.h"
#include "support/ack_model.h"
#include "support/crash_check.h"

namespace qm = qcowfs::testing::mount;
using qcowfs::testing::AckModel;

namespace {

bool LongMode() {
  for (const char* v : {"QCOWFS_CRASH_EXHAUSTIVE", "QCOWFS_LONG"}) {
    const char* e = getenv(v);
    if (e != nullptr && std::string(e) == "1") return true;
  }
  return false;
}

std::string PreloadPath() { return qcowfs::testing::SyncFaultPreloadPath(); }

struct KillCase {
  const char* name;
  std::string opts;  // qemu-img create -o
  uint64_t cluster_size;
  uint64_t size;     // guest size
  uint64_t prefill;  // bytes qemu-io writes first (toward a refcount-table boundary)
  bool lazy = false;
  int groups = 24;  // workload: groups of writes, each ended by an fsync
  uint64_t max_write = 16 * qm::KiB;
};

struct Step {
  bool fsync;
  uint64_t off, len;
};

// Groups of two or three writes, each group ended by an fsync. Half of the writes land
// next to an earlier one (new clusters in an existing L2 table: the refcounts of a new
// refcount block must be on disk before that table points at them), half anywhere.
std::vector<Step> MakeWorkload(const KillCase& c) {
  std::mt19937_64 rng(std::hash<std::string>()(c.name));
  const uint64_t cs = c.cluster_size;
  std::vector<Step> steps;
  uint64_t prev_end = c.prefill;
  for (int g = 0; g < c.groups; g++) {
    int n = 2 + static_cast<int>(rng() % 2);
    for (int i = 0; i < n; i++) {
      uint64_t len;
      switch (rng() % 3) {
        case 0:
          len = 512 * (1 + rng() % 8);
          break;
        case 1:
          len = cs * (1 + rng() % 4);
          break;
        default:
          len = 1 + rng() % c.max_write;
          break;
      }
      uint64_t off = rng() % 2 ? prev_end + (rng() % 2) * cs : rng() % (c.size - len);
      if (rng() % 2) off &= ~(cs - 1);
      off = std::min(off, c.size - len);
      steps.push_back(Step{false, off, len});
      prev_end = off + len;
    }
    steps.push_back(Step{true, 0, 0});
  }
  return steps;
}

// Whether our child pid has exited, without collecting it (MountGuard collects it).
bool ExitedNoReap(pid_t pid) {
  siginfo_t si{};
  return waitid(P_PID, static_cast<id_t>(pid), &si, WEXITED | WNOHANG | WNOWAIT) == 0 &&
         si.si_pid == pid;
}

struct Counts {
  long long syncs = 0, writes = 0;
};

class SyncKillRunner {
 public:
  explicit SyncKillRunner(const KillCase& c) : c_(c), steps_(MakeWorkload(c)) {}

  // Image, workload and a run without faults that counts the daemon's syncs and writes.
  void Prepare() {
    qm::RequireMountTools();
    preload_ = PreloadPath();
    qm::QemuImgCreate(pristine_, std::to_string(c_.size), c_.opts);
    if (c_.prefill) qm::QemuIo(pristine_, {"write -P 0x5a 0 " + std::to_string(c_.prefill)});
    initial_ = Convert(pristine_);
    REQUIRE(initial_.size() == c_.size);
    Round r = Run({});
    INFO("calibration run: " << r.why);
    REQUIRE_FALSE(r.failed);
    REQUIRE(r.why.empty());
    calib_ = r;
    qcowfs::testing::ImageCheck chk = qcowfs::testing::QemuImgCheck(img_);
    INFO(qcowfs::testing::DescribeCheck(chk, "after the run without faults"));
    REQUIRE(chk.exit_code == 0);
    std::vector<uint8_t> got = Convert(img_);
    REQUIRE(got == model_->current());
    MESSAGE(std::string(c_.name) << ": the workload makes " << r.end.syncs - r.mounted.syncs
                                 << " host syncs (" << r.unmounted.syncs - r.end.syncs
                                 << " more at unmount) and " << r.end.writes << " host writes, "
                                 << steps_.size() << " steps");
  }

  // SIGKILL at every N (long mode), or in CI at the syncs inside the fsyncs that wrote
  // metadata (more than two syncs: data, refcount blocks, L2 tables, L1 and refcount
  // table, header), at most kMaxInner of them, plus a few spread over the rest.
  void KillAtSyncs() {
    const long long first = calib_.mounted.syncs + 1, last = calib_.end.syncs,
                    after = calib_.unmounted.syncs;
    std::set<long long> ns;
    if (LongMode()) {
      for (long long n = first; n <= after; n++) ns.insert(n);
    } else {
      std::vector<long long> inner;
      long long prev = calib_.mounted.syncs;
      for (long long end : calib_.fsync_ends) {
        if (end - prev > 2)
          for (long long n = prev + 2; n < end; n++) inner.push_back(n);
        prev = end;
      }
      constexpr size_t kMaxInner = 24;
      for (size_t i = 0; i < inner.size(); i++)
        if (inner.size() <= kMaxInner ||
            i * kMaxInner / inner.size() != (i + 1) * kMaxInner / inner.size())
          ns.insert(inner[i]);
      for (int i = 0; i < 6; i++) ns.insert(first + i * (last - first) / 5);
      for (long long n = last + 1; n <= after && n <= last + 2; n++) ns.insert(n);
    }
    int died = 0;
    for (long long n : ns) {
      CAPTURE(n);
      Round r = Run({{"QCOWFS_FAULT_KILL_AT_SYNC", std::to_string(n)}});
      if (!r.why.empty()) {
        // Killed at its own N-th sync: exit status 128 + SIGKILL.
        CHECK_MESSAGE(qm::Contains(r.why, "status 137"), r.why);
        died++;
      }
      CHECK_MESSAGE(r.why.empty() == (n > after),
                    "kill at sync " << n << " of " << after << ": " << r.why);
      VerifyAndReuse("kill at sync " + std::to_string(n));
    }
    MESSAGE(std::string(c_.name) << ": SIGKILL at " << ns.size() << " sync points (" << died
                                 << " killed the daemon)");
  }

  // Syncs failing with EIO, or host writes failing with ENOSPC, from the N-th on: the
  // daemon reports errors, stays up, unmounts; the image is consistent.
  void FailFrom(const char* var, long long first, long long last, int count) {
    int failed = 0;
    for (int i = 0; i < count; i++) {
      long long n = first + i * (last - first) / std::max(1, count - 1);
      CAPTURE(n);
      Round r = Run({{var, std::to_string(n)}});
      failed += r.failed;
      INFO(r.why);
      CHECK_FALSE(qm::IsMounted(mp_));
      CHECK_FALSE(qm::Contains(r.why, "still running"));
      VerifyAndReuse(std::string(var) + "=" + std::to_string(n));
    }
    MESSAGE(std::string(c_.name) << ": " << std::string(var) << " at " << count << " points, "
                                 << failed << " runs saw an I/O error");
  }

  // What the run without faults counted after the mount and after the workload.
  const Counts& mounted() const { return calib_.mounted; }
  const Counts& end() const { return calib_.end; }

 private:
  struct Round {
    bool failed = false;  // a write or fsync through the mount failed
    std::string why;      // unmount problems ("" for a clean unmount)
    Counts mounted, end, unmounted;
    std::vector<long long> fsync_ends;  // syncs counted when each fsync returned
  };

  std::vector<uint8_t> Convert(const std::string& img) {
    qm::Must({"qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", img, raw_});
    std::string bytes = qm::ReadFileText(raw_);
    return std::vector<uint8_t>(bytes.begin(), bytes.end());
  }

  Counts ReadCounts() {
    Counts c;
    std::istringstream in(qm::ReadFileText(count_));
    in >> c.syncs >> c.writes;
    return c;
  }

  // A fresh copy of the image, mounted with the preload and `faults`; the workload until
  // the first failure; then the mount is taken down (a killed daemon: its stale mount).
  Round Run(const std::map<std::string, std::string>& faults) {
    std::filesystem::copy_file(pristine_, img_, std::filesystem::copy_options::overwrite_existing);
    ::unlink(count_.c_str());
    qm::RunOpts o;
    qcowfs::testing::AddSyncFaultPreload(&o.env, preload_);
    o.env["QCOWFS_FAULT_SYNC_COUNT_FILE"] = count_;
    for (const auto& [k, v] : faults) o.env[k] = v;
    model_ = std::make_unique<AckModel>(initial_);
    Round r;
    qm::MountGuard g(mp_, {"mount", img_, mp_}, "", o);
    REQUIRE_MOUNTED(g);
    r.mounted = ReadCounts();
    {
      qm::Fd fd(mp_, O_RDWR);
      REQUIRE(fd.valid());
      for (const Step& s : steps_) {
        if (s.fsync) {
          if (::fsync(fd.get()) != 0) {
            r.failed = true;
            break;
          }
          model_->FlushReturned(0);
          r.fsync_ends.push_back(ReadCounts().syncs);
        } else {
          const std::vector<uint8_t>& d = model_->Write(s.off, s.len, 0);
          if (!qm::PwriteAll(fd.get(), d.data(), s.len, s.off)) {
            r.failed = true;  // the write may have landed in part: the model allows it
            break;
          }
        }
      }
      (void)fd.Close();
    }
    r.end = ReadCounts();
    // Under a kill fault, a failure means the daemon is dying (other faults: it lives on).
    if (r.failed && faults.count("QCOWFS_FAULT_KILL_AT_SYNC"))
      qm::WaitFor([&] { return ExitedNoReap(g.pid()); }, 10000);
    if (ExitedNoReap(g.pid())) {
      // The daemon is gone and its mount stale: unmount it, then collect the daemon.
      qm::RunTimed({"fusermount3", "-u", mp_}, qm::WithTimeout(15000));
      r.why = g.SignalAndWait(SIGKILL);
    } else {
      r.why = g.Unmount();
    }
    r.unmounted = ReadCounts();
    return r;
  }

  // The image after a faulty run: qemu-img check, the acknowledged data, then a remount
  // that writes more, a clean unmount, and check and contents again.
  void VerifyAndReuse(const std::string& what) {
    INFO(std::string(c_.name) << ", " << what);
    const bool dirty = qcowfs::testing::DirtyBitOf(img_);
    CHECK_MESSAGE((!dirty || c_.lazy), "dirty bit set without lazy refcounts");
    qcowfs::testing::ImageCheck chk = qcowfs::testing::QemuImgCheck(img_);
    CHECK_MESSAGE(qcowfs::testing::CrashCheckPasses(chk, true, dirty),
                  qcowfs::testing::DescribeCheck(chk, "after the fault"));
    std::vector<uint8_t> got = Convert(img_);
    model_->CrashAt(0);  // every fsync that returned counts; every write may have landed
    std::string bad = model_->Check(got.data(), got.size());
    CHECK_MESSAGE(bad.empty(), "after the fault: " << bad);
    {
      qm::MountGuard g(mp_, {"mount", img_, mp_});
      REQUIRE_MOUNTED(g);
      qm::Fd fd(mp_, O_RDWR);
      REQUIRE(fd.valid());
      const std::pair<uint64_t, uint64_t> more[] = {
          {0, 4096 + 100}, {c_.size - 3 * c_.cluster_size, 2 * c_.cluster_size}};
      for (int j = 0; j < 2; j++) {
        auto [off, len] = more[j];
        std::memset(&got[off], 0xe0 + j, len);
        CHECK(qm::PwriteAll(fd.get(), &got[off], len, off));
      }
      CHECK(::fsync(fd.get()) == 0);
      (void)fd.Close();
      CHECK_UNMOUNTS(g);
    }
    chk = qcowfs::testing::QemuImgCheck(img_);
    // A lazy image was rebuilt at the remount: exact refcounts.
    CHECK_MESSAGE(qcowfs::testing::CrashCheckPasses(chk, !dirty, false),
                  qcowfs::testing::DescribeCheck(chk, "after the remount"));
    CHECK_MESSAGE(Convert(img_) == got, "contents after the remount differ");
  }

  KillCase c_;
  std::vector<Step> steps_;
  qm::Scratch s_;
  std::string pristine_ = s_.File("pristine.qcow2"), img_ = s_.File("img.qcow2"),
              raw_ = s_.File("img.raw"), count_ = s_.File("sync-count"), mp_ = s_.FileMountpoint();
  std::string preload_;
  std::vector<uint8_t> initial_;
  std::unique_ptr<AckModel> model_;
  Round calib_;
};

const KillCase k512{.name = "c512-rc64",
                    .opts = "cluster_size=512,refcount_bits=64",
                    .cluster_size = 512,
                    .size = 8 * qm::MiB,
                    .prefill = 1900 * qm::KiB,
                    .groups = 12,
                    .max_write = 48 * qm::KiB};

const KillCase k4k{.name = "c4k-rc16",
                   .opts = "cluster_size=4096",
                   .cluster_size = 4096,
                   .size = 16 * qm::MiB,
                   .prefill = 8 * qm::MiB - 96 * qm::KiB,
                   .max_write = 64 * qm::KiB};

const KillCase k4kLazy{.name = "c4k-lazy",
                       .opts = "cluster_size=4096,lazy_refcounts=on",
                       .cluster_size = 4096,
                       .size = 8 * qm::MiB,
                       .prefill = 0,
                       .lazy = true,
                       .groups = 12,
                       .max_write = 64 * qm::KiB};

}  // namespace

TEST_CASE("sync kill: c512-rc64 SIGKILL at the Nth host fdatasync") {
  SyncKillRunner r(k512);
  r.Prepare();
  r.KillAtSyncs();
}

TEST_CASE("sync kill: c4k-rc16 SIGKILL at the Nth host fdatasync (a new refcount block)") {
  SyncKillRunner r(k4k);
  r.Prepare();
  r.KillAtSyncs();
}

TEST_CASE("sync kill: c4k-lazy SIGKILL at the Nth host fdatasync (lazy refcounts)") {
  SyncKillRunner r(k4kLazy);
  r.Prepare();
  r.KillAtSyncs();
}

TEST_CASE("sync kill: c512-rc64 host fdatasync fails with EIO from the Nth on") {
  SyncKillRunner r(k512);
  r.Prepare();
  r.FailFrom("QCOWFS_FAULT_FAIL_SYNC_AFTER", r.mounted().syncs + 1, r.end().syncs,
             LongMode() ? 16 : 6);
}

TEST_CASE("sync kill: c512-rc64 host writes fail with ENOSPC from the Nth on") {
  SyncKillRunner r(k512);
  r.Prepare();
  r.FailFrom("QCOWFS_FAULT_ENOSPC_WRITE_AFTER", r.mounted().writes + 1, r.end().writes,
             LongMode() ? 16 : 6);
}
