#include "daemon/daemon.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "config/control_protocol.h"
#include "config/mirror_job.h"
#include "daemon/control_server.h"
#include "fuse/fuse_server.h"
#include "mirror/mirror_filter.h"
#include "mirror/mirror_job.h"
#include "mirror/target.h"
#include "qcow2/image.h"
#include "util/fd.h"
#include "util/log.h"

namespace qcowfs::daemon {
namespace {

using nlohmann::json;

std::string Absolute(const std::string& p) {
  char buf[PATH_MAX];
  if (realpath(p.c_str(), buf)) return buf;
  return p;
}

// One mounted image: the engine, the mirror filter the FUSE frontend sees, the export.
struct Mounted {
  std::unique_ptr<qcow2::Qcow2Image> image;  // null once a job pivoted away from it
  std::unique_ptr<mirror::MirrorFilter> filter;
  std::unique_ptr<fuse::Export> exp;
  std::string path;  // absolute image path
  bool cache_none = false;
};

// Test hook: QCOWFS_TEST_DIO_ALIGN raises the O_DIRECT alignment (e.g. 4096 on a host
// with 512-byte sectors) so the tests exercise read-modify-write of 4K host blocks.
uint32_t TestDirectAlign() {
  const char* v = getenv("QCOWFS_TEST_DIO_ALIGN");
  return v ? static_cast<uint32_t>(strtoul(v, nullptr, 10)) : 0;
}

bool Running(const mirror::MirrorJob& j) {
  auto s = j.state();
  return s == mirror::JobState::kRunning || s == mirror::JobState::kReady;
}

// The mirror jobs of a mount. Control commands run on the control thread one at a time;
// jobs_ is only touched there and at shutdown (after the control thread stopped).
class Jobs {
 public:
  explicit Jobs(std::vector<Mounted>* mounted) : mounted_(mounted) {}

  Result<std::string> Start(const std::string& args) {
    ASSIGN_OR_RETURN(config::MirrorJobConfig job, config::ParseMirrorJob(args));
    return StartJob(std::move(job));
  }

  Result<std::string> StartJob(config::MirrorJobConfig job) {
    Mounted* m = nullptr;
    if (job.image.empty()) {
      if (mounted_->size() != 1) return Status::Invalid("image: several images are mounted; name one");
      m = &(*mounted_)[0];
    } else {
      for (auto& x : *mounted_)
        if (x.exp->name == job.image) m = &x;
      if (!m) return Status::Invalid("image: no mounted image is named \"" + job.image + "\"");
    }
    job.image = m->exp->name;
    if (!m->image) return Status::Invalid("image " + job.image + ": it now serves its mirror target; remount to mirror it again");
    if (m->exp->read_only) return Status::Invalid("image " + job.image + ": mounted read-only");
    for (auto& j : jobs_)
      if (j->image() == job.image && Running(*j))
        return Status::Invalid("image " + job.image + ": job " + j->id() + " is already mirroring it");
    if (job.id.empty()) {
      for (;; next_id_++) {
        std::string id = "job" + std::to_string(next_id_);
        if (!Find(id)) {
          job.id = id;
          break;
        }
      }
    } else if (auto* old = Find(job.id); old && Running(*old)) {
      return Status::Invalid("id: job " + job.id + " is still running");
    }
    const auto& geo = m->image->geometry();
    uint64_t g = job.granularity;
    if (g == 0) g = std::clamp<uint64_t>(geo.cluster_size, 4096, 65536);
    if (job.buf_size < g) return Status::Invalid("buf_size: must be at least the granularity (" + std::to_string(g) + ")");
    mirror::SourceInfo src;
    src.size = m->filter->Size();
    src.cluster_bits = geo.cluster_bits;
    src.files.push_back(m->path);
    for (const auto& f : m->image->BackingFiles()) src.files.push_back(Absolute(f));
    // Sync "top" of an image with a backing file: the new target gets the same base (or
    // target.backing) and only what the top layer allocates is copied. Without a backing
    // file "top" is "full".
    const bool top = job.sync == config::MirrorJobConfig::Sync::kTop && m->image->backing() && src.files.size() > 1;
    if (top) {
      src.top_backing = src.files[1];
      src.top_backing_format = dynamic_cast<qcow2::Qcow2Image*>(m->image->backing()) ? "qcow2" : "raw";
    }
    ASSIGN_OR_RETURN(mirror::Target target, mirror::OpenTarget(job.target, src, job.target_timeout_s));
    auto j = std::make_unique<mirror::MirrorJob>(job, g, job.image, m->filter.get(), m->image.get(), std::move(target));
    if (top) {
      qcow2::Qcow2Image* img = m->image.get();
      j->set_top_only([img](uint64_t off, uint64_t len) { return img->GetTopBlockStatus(off, len); });
    }
    j->Start();
    std::string report = config::MirrorReportToJson(j->Report());
    // A finished job of the same id is replaced.
    jobs_.erase(std::remove_if(jobs_.begin(), jobs_.end(), [&](const auto& x) { return x->id() == job.id; }),
                jobs_.end());
    jobs_.push_back(std::move(j));
    return report;
  }

  Result<std::string> Status_(const std::string& args) {
    std::string id = IdArg(args, false);
    if (!id.empty()) {
      auto* j = Find(id);
      if (!j) return Status::Invalid("no mirror job \"" + id + "\"");
      return config::MirrorReportToJson(j->Report());
    }
    json all = json::array();
    for (auto& j : jobs_) all.push_back(json::parse(config::MirrorReportToJson(j->Report())));
    return json{{"jobs", all}}.dump();
  }

  Result<std::string> SetSpeed(const std::string& args) {
    ASSIGN_OR_RETURN(mirror::MirrorJob * j, Need(args));
    json a = json::parse(args);
    if (!a.contains("speed") || !a["speed"].is_number_unsigned())
      return Status::Invalid("speed: must be a number of bytes per second (0: unlimited)");
    j->SetSpeed(a["speed"].get<uint64_t>());
    return config::MirrorReportToJson(j->Report());
  }

  Result<std::string> Complete(const std::string& args) {
    ASSIGN_OR_RETURN(mirror::MirrorJob * j, Need(args));
    json a = json::parse(args);
    bool pivot = !a.contains("pivot") || (a["pivot"].is_boolean() && a["pivot"].get<bool>());
    RETURN_IF_ERROR(j->Complete(pivot));
    if (j->pivoted()) {
      // The mount serves the target now: close the source at once (clean, unlocked).
      for (auto& m : *mounted_)
        if (m.exp->name == j->image() && m.image) {
          Status s = m.image->Close();
          if (!s.ok()) QCOWFS_LOG(Error, "closing %s after the pivot: %s", m.path.c_str(), s.message().c_str());
          m.image.reset();
          m.exp->image_path = PivotPath(*j);
        }
    }
    return config::MirrorReportToJson(j->Report());
  }

  Result<std::string> Cancel(const std::string& args) {
    ASSIGN_OR_RETURN(mirror::MirrorJob * j, Need(args));
    j->Cancel();
    return config::MirrorReportToJson(j->Report());
  }

  std::vector<config::MirrorReport> Reports() {
    std::vector<config::MirrorReport> out;
    for (auto& j : jobs_) out.push_back(j->Report());
    return out;
  }

  // Unmount / SIGTERM: running jobs are cancelled; targets that serve a mount are closed.
  int Shutdown() {
    int rc = 0;
    for (auto& j : jobs_) j->Cancel();
    for (auto& j : jobs_)
      if (j->pivoted()) {
        Status s = j->CloseTarget();
        if (!s.ok()) {
          QCOWFS_LOG(Error, "closing the mirror target of %s: %s", j->image().c_str(), s.message().c_str());
          rc = 1;
        }
      }
    jobs_.clear();
    return rc;
  }

 private:
  static std::string PivotPath(const mirror::MirrorJob& j) {
    json t = json::parse(config::MirrorReportToJson(j.Report()))["target"];
    if (t.contains("path")) return Absolute(t["path"].get<std::string>());
    return t.value("nbd", std::string());
  }

  mirror::MirrorJob* Find(const std::string& id) {
    for (auto& j : jobs_)
      if (j->id() == id) return j.get();
    return nullptr;
  }

  static std::string IdArg(const std::string& args, bool) {
    try {
      json a = json::parse(args);
      if (a.is_object() && a.contains("id") && a["id"].is_string()) return a["id"].get<std::string>();
    } catch (const json::exception&) {
    }
    return "";
  }

  Result<mirror::MirrorJob*> Need(const std::string& args) {
    std::string id = IdArg(args, true);
    if (id.empty()) return Status::Invalid("id: give the job's id");
    auto* j = Find(id);
    if (!j) return Status::Invalid("no mirror job \"" + id + "\"");
    return j;
  }

  std::vector<Mounted>* mounted_;
  std::vector<std::unique_ptr<mirror::MirrorJob>> jobs_;
  int next_id_ = 0;
};

}  // namespace

int RunMount(const config::MountConfig& cfg) {
  const std::string mountpoint = Absolute(cfg.mountpoint);
  if (access(mountpoint.c_str(), F_OK) != 0) {
    std::fprintf(stderr, "qcowfs: %s: mountpoint does not exist\n", cfg.mountpoint.c_str());
    return 1;
  }
  std::vector<Mounted> mounted;
  std::vector<UniqueFd> fds;
  for (const auto& ic : cfg.images) {
    qcow2::OpenOptions o;
    o.read_only = ic.read_only;
    o.cache_size = ic.cache_size;
    o.discard_unmap = ic.discard_unmap;
    o.direct_io.enabled = ic.cache_none;
    if (ic.cache_none) o.direct_io.min_align = TestDirectAlign();
    auto r = qcow2::Qcow2Image::Open(ic.path, o);
    if (!r.ok()) {
      std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
      return 1;
    }
    Mounted m;
    m.image = std::move(r).value();
    m.filter = std::make_unique<mirror::MirrorFilter>(m.image.get());
    m.path = Absolute(ic.path);
    m.cache_none = ic.cache_none;
    m.exp = std::make_unique<fuse::Export>();
    m.exp->name = ic.name;
    m.exp->image_path = m.path;
    m.exp->image_fd = ::open(ic.path.c_str(), O_PATH | O_CLOEXEC);
    fds.emplace_back(m.exp->image_fd);
    m.exp->dev = m.filter.get();
    m.exp->read_only = ic.read_only;
    m.exp->discard_unmap = ic.discard_unmap;
    mounted.push_back(std::move(m));
  }
  std::vector<fuse::Export*> raw;
  for (auto& m : mounted) raw.push_back(m.exp.get());

  fuse::ServerOptions so;
  so.mountpoint = mountpoint;
  so.threads = cfg.threads;
  so.poll_us = cfg.poll_us;
  fuse::ParseTransport(cfg.transport, &so.transport);  // validated with the config
  so.allow_other = cfg.allow_other;
  so.foreground = cfg.foreground;
  so.debug = cfg.debug;
  fuse::FuseServer server(so, raw);
  Jobs jobs(&mounted);

  ControlServer control(cfg.socket.empty() ? config::DefaultSocketPath(mountpoint) : Absolute(cfg.socket));
  if (Status s = control.Bind(); !s.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", s.message().c_str());
    return 1;
  }
  control.Register("status", [&](const std::string&) -> Result<std::string> {
    config::StatusReport r;
    r.mountpoint = mountpoint;
    r.pid = getpid();
    r.threads = server.threads();
    r.transport = server.transport();
    for (auto& m : mounted) {
      config::ImageReport ir;
      fuse::Export* e = m.exp.get();
      ir.name = e->name;
      ir.path = e->image_path;
      ir.virtual_size = m.filter->Size();
      ir.allocated_bytes = m.filter->AllocatedBytes();
      ir.read_only = e->read_only;
      // After a pivot the mount serves the mirror target, opened through the page cache.
      ir.cache_mode = m.image && m.cache_none ? "none" : "writeback";
      if (m.image) {
        auto st = m.image->Stats();
        ir.corrupt = m.image->corrupt();
        ir.l2_hits = st.l2_hits;
        ir.l2_misses = st.l2_misses;
        ir.refblock_hits = st.refblock_hits;
        ir.refblock_misses = st.refblock_misses;
      }
      ir.in_flight = e->in_flight.load();
      ir.reads = e->reads.load();
      ir.writes = e->writes.load();
      ir.discards = e->discards.load();
      ir.flushes = e->flushes.load();
      r.images.push_back(ir);
    }
    r.mirrors = jobs.Reports();
    return config::StatusToJson(r);
  });
  control.Register("mirror-start", [&](const std::string& a) { return jobs.Start(a); });
  control.Register("mirror-status", [&](const std::string& a) { return jobs.Status_(a); });
  control.Register("mirror-set-speed", [&](const std::string& a) { return jobs.SetSpeed(a); });
  control.Register("mirror-complete", [&](const std::string& a) { return jobs.Complete(a); });
  control.Register("mirror-cancel", [&](const std::string& a) { return jobs.Cancel(a); });

  if (Status s = server.Mount(); !s.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", s.message().c_str());
    return 1;
  }
  server.Daemonize();
  // Jobs from the config start once the mount is live; one that is refused is logged and
  // the mount goes on.
  for (const auto& job : cfg.mirrors) {
    auto r = jobs.StartJob(job);
    if (!r.ok()) QCOWFS_LOG(Error, "mirror job from the config not started: %s", r.status().message().c_str());
  }
  control.Start();
  QCOWFS_LOG(Info, "mounted %zu image(s) on %s", mounted.size(), mountpoint.c_str());
  // Under systemd (qcowfs@.service, Type=notify) the service is up once the mount is live
  // and the control socket answers; without NOTIFY_SOCKET these calls do nothing.
  sd_notifyf(0, "READY=1\nSTATUS=%zu image(s) mounted on %s", mounted.size(), mountpoint.c_str());
  Status run = server.Run();
  sd_notify(0, "STOPPING=1");
  control.Stop();
  int rc = jobs.Shutdown();
  if (!run.ok()) {
    QCOWFS_LOG(Error, "%s", run.message().c_str());
    rc = 1;
  }
  for (auto& m : mounted) {
    if (!m.image) continue;
    Status s = m.image->Close();
    if (!s.ok()) {
      QCOWFS_LOG(Error, "closing %s: %s", m.path.c_str(), s.message().c_str());
      rc = 1;
    }
  }
  return rc;
}

}  // namespace qcowfs::daemon
