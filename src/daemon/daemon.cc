#include "daemon/daemon.h"

#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "config/control_protocol.h"
#include "daemon/control_server.h"
#include "fuse/fuse_server.h"
#include "qcow2/image.h"
#include "util/fd.h"
#include "util/log.h"

namespace qcowfs::daemon {
namespace {

std::string Absolute(const std::string& p) {
  char buf[PATH_MAX];
  if (realpath(p.c_str(), buf)) return buf;
  return p;
}

}  // namespace

int RunMount(const config::MountConfig& cfg) {
  const std::string mountpoint = Absolute(cfg.mountpoint);
  if (access(mountpoint.c_str(), F_OK) != 0) {
    std::fprintf(stderr, "qcowfs: %s: mountpoint does not exist\n", cfg.mountpoint.c_str());
    return 1;
  }
  if (!cfg.mirrors.empty())
    QCOWFS_LOG(Warn, "%zu mirror job(s) in the config not started: the mirror job is not implemented yet",
               cfg.mirrors.size());
  std::vector<std::unique_ptr<qcow2::Qcow2Image>> images;
  std::vector<std::unique_ptr<fuse::Export>> exports;
  std::vector<UniqueFd> fds;
  for (const auto& ic : cfg.images) {
    qcow2::OpenOptions o;
    o.read_only = ic.read_only;
    o.cache_size = ic.cache_size;
    o.discard_unmap = ic.discard_unmap;
    auto r = qcow2::Qcow2Image::Open(ic.path, o);
    if (!r.ok()) {
      std::fprintf(stderr, "qcowfs: %s\n", r.status().message().c_str());
      return 1;
    }
    auto e = std::make_unique<fuse::Export>();
    e->name = ic.name;
    e->image_path = Absolute(ic.path);
    e->image_fd = ::open(ic.path.c_str(), O_PATH | O_CLOEXEC);
    fds.emplace_back(e->image_fd);
    e->dev = r.value().get();
    e->read_only = ic.read_only;
    e->discard_unmap = ic.discard_unmap;
    images.push_back(std::move(r).value());
    exports.push_back(std::move(e));
  }
  std::vector<fuse::Export*> raw;
  for (auto& e : exports) raw.push_back(e.get());

  fuse::ServerOptions so;
  so.mountpoint = mountpoint;
  so.threads = cfg.threads;
  so.poll_us = cfg.poll_us;
  so.allow_other = cfg.allow_other;
  so.foreground = cfg.foreground;
  so.debug = cfg.debug;
  fuse::FuseServer server(so, raw);

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
    for (size_t i = 0; i < exports.size(); i++) {
      config::ImageReport ir;
      fuse::Export* e = exports[i].get();
      qcow2::Qcow2Image* img = images[i].get();
      auto st = img->Stats();
      ir.name = e->name;
      ir.path = e->image_path;
      ir.virtual_size = img->Size();
      ir.allocated_bytes = img->AllocatedBytes();
      ir.read_only = e->read_only;
      ir.corrupt = img->corrupt();
      ir.l2_hits = st.l2_hits;
      ir.l2_misses = st.l2_misses;
      ir.refblock_hits = st.refblock_hits;
      ir.refblock_misses = st.refblock_misses;
      ir.in_flight = e->in_flight.load();
      ir.reads = e->reads.load();
      ir.writes = e->writes.load();
      ir.discards = e->discards.load();
      ir.flushes = e->flushes.load();
      r.images.push_back(ir);
    }
    return config::StatusToJson(r);
  });

  if (Status s = server.Mount(); !s.ok()) {
    std::fprintf(stderr, "qcowfs: %s\n", s.message().c_str());
    return 1;
  }
  server.Daemonize();
  control.Start();
  QCOWFS_LOG(Info, "mounted %zu image(s) on %s", images.size(), mountpoint.c_str());
  Status run = server.Run();
  control.Stop();
  int rc = 0;
  if (!run.ok()) {
    QCOWFS_LOG(Error, "%s", run.message().c_str());
    rc = 1;
  }
  for (size_t i = 0; i < images.size(); i++) {
    Status s = images[i]->Close();
    if (!s.ok()) {
      QCOWFS_LOG(Error, "closing %s: %s", exports[i]->image_path.c_str(), s.message().c_str());
      rc = 1;
    }
  }
  return rc;
}

}  // namespace qcowfs::daemon
