#include "fuse/fuse_server.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>

#include "fuse/fuse_ops.h"
#include "fuse/kernel_io.h"
#include "util/log.h"

namespace qcowfs::fuse {

FuseServer::FuseServer(ServerOptions opts, std::vector<Export*> exports)
    : opts_(std::move(opts)), exports_(std::move(exports)) {}

FuseServer::~FuseServer() {
  ring_view_.store(nullptr, std::memory_order_release);
  ring_.reset();
  if (se_) {
    if (mounted_) fuse_session_unmount(se_);
    fuse_session_destroy(se_);
  }
}

Status FuseServer::Mount() {
  struct stat st;
  if (::stat(opts_.mountpoint.c_str(), &st) < 0)
    return Status::Error(errno, opts_.mountpoint + ": mountpoint " + std::strerror(errno));
  mountpoint_st_ = st;
  if (S_ISREG(st.st_mode)) {
    if (exports_.size() != 1)
      return Status::Invalid(opts_.mountpoint + ": a regular-file mountpoint shows exactly one image");
    file_mode_ = true;
  } else if (!S_ISDIR(st.st_mode)) {
    return Status::Invalid(opts_.mountpoint + ": mountpoint must be a regular file or a directory");
  }
  if (opts_.transport == Transport::kRing) {
    // Checked before mounting, so a mount that cannot have the ring fails at once.
    std::string why = RingUnavailableReason(/*probe_io_uring=*/true);
    if (!why.empty()) return Status::NotSupported("transport ring: " + why);
  }
  threads_ = opts_.threads ? opts_.threads : std::max(1u, std::thread::hardware_concurrency());
  std::string o = "fsname=qcowfs,subtype=qcowfs,max_read=1048576,default_permissions";
  if (opts_.allow_other) o += ",allow_other";
  std::vector<std::string> argv_s = {"qcowfs", "-o", o};
  if (opts_.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());
  se_ = fuse_session_new(&args, Operations(), sizeof(fuse_lowlevel_ops), this);
  fuse_opt_free_args(&args);
  if (!se_) return Status::Invalid(opts_.mountpoint + ": could not create the FUSE session");
  if (fuse_session_mount(se_, opts_.mountpoint.c_str()) != 0)
    return Status::IoError(opts_.mountpoint + ": mount failed (is /dev/fuse available and the mountpoint free?)");
  mounted_ = true;
  if (!InstallKernelIo(se_, opts_.poll_us))
    QCOWFS_LOG(Warn, "%s: parallel direct writes unavailable", opts_.mountpoint.c_str());
  return Status::Ok();
}

void FuseServer::Daemonize() {
  if (opts_.foreground) return;
  SetLogToSyslog(true);
  fuse_daemonize(0);
}

// The ring threads start here, not in Mount(): Daemonize() forks, and only the forking
// thread lives on in the child. The kernel's INIT waits in /dev/fuse until the loop runs.
Status FuseServer::StartRing() {
  if (opts_.transport == Transport::kLegacy) return Status::Ok();
  std::string why = RingUnavailableReason();
  if (why.empty()) {
    ring_ = std::make_unique<FuseRing>(se_, opts_.ring_threads_per_queue, opts_.transport == Transport::kRing);
    if (Status s = ring_->Prepare(); !s.ok()) {
      ring_.reset();
      why = s.message();
    }
  }
  if (why.empty()) {
    ring_view_.store(ring_.get(), std::memory_order_release);
    return Status::Ok();
  }
  if (opts_.transport == Transport::kRing) return Status::NotSupported("transport ring: " + why);
  QCOWFS_LOG(Info, "FUSE over io_uring not used: %s; serving through /dev/fuse", why.c_str());
  return Status::Ok();
}

Status FuseServer::Run() {
  if (Status s = StartRing(); !s.ok()) {
    fuse_session_unmount(se_);
    mounted_ = false;
    return s;
  }
  if (fuse_set_signal_handlers(se_) != 0) return Status::IoError("could not install signal handlers");
  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_max_threads(cfg, threads_);
  fuse_loop_cfg_set_idle_threads(cfg, threads_);
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  int rc = fuse_session_loop_mt(se_, cfg);
  ReleaseParkedWorkers();
  if (ring_) ring_->Stop();  // before the unmount: no thread serves the ring after this
  fuse_loop_cfg_destroy(cfg);
  fuse_remove_signal_handlers(se_);
  fuse_session_unmount(se_);
  mounted_ = false;
  if (rc < 0) return Status::Error(-rc, std::string("FUSE session loop: ") + std::strerror(-rc));
  if (opts_.transport == Transport::kRing && ring_ && !ring_->failure().empty())
    return Status::NotSupported("transport ring: " + ring_->failure());
  return Status::Ok();
}

void FuseServer::Stop() {
  if (se_) fuse_session_exit(se_);
  ReleaseParkedWorkers();
}

}  // namespace qcowfs::fuse
