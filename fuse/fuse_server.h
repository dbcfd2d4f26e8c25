// FuseServer: exposes BlockDevices as regular files through the kernel's FUSE
// (low-level API, multi-threaded session loop). No qcow2 knowledge here.
//
// A regular-file mountpoint shows the single export as that file (root inode);
// a directory mountpoint shows each export as an entry of the root directory.
// Handlers reply exactly once, and never hold a lock across a reply or I/O.
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "block/block_device.h"
#include "fuse/ring.h"
#include "util/status.h"

struct fuse_session;

namespace qcowfs::fuse {

struct Export {
  std::string name;         // entry name in directory mode
  std::string image_path;   // for status
  int image_fd = -1;        // O_PATH fd of the image file: owner/mode/times (fstat)
  block::BlockDevice* dev = nullptr;
  bool read_only = false;
  bool discard_unmap = true;  // false: punch zeroes but frees nothing
  // Counters (status).
  std::atomic<uint64_t> in_flight{0};
  std::atomic<uint64_t> reads{0}, writes{0}, discards{0}, flushes{0};
};

struct ServerOptions {
  std::string mountpoint;  // absolute
  unsigned threads = 0;    // 0: number of CPUs
  uint32_t poll_us = 50;   // poll the FUSE device this long before sleeping (kernel_io.h)
  Transport transport = Transport::kAuto;  // ring.h
  unsigned ring_threads_per_queue = 2;     // ring threads (each one request at a time) per CPU queue
  bool allow_other = false;
  bool foreground = false;
  bool debug = false;
};

class FuseServer {
 public:
  FuseServer(ServerOptions opts, std::vector<Export*> exports);
  ~FuseServer();

  // Mounts; on return the mount is live (requests queue until Run()).
  Status Mount();
  // Detaches into the background unless foreground (parent exits 0 here).
  void Daemonize();
  // Serves requests until unmount or SIGTERM/SIGINT/SIGHUP. Unmounts on return.
  Status Run();
  // Asks the loop to stop (control socket, tests).
  void Stop();

  const ServerOptions& options() const { return opts_; }
  const std::vector<Export*>& exports() const { return exports_; }
  bool file_mode() const { return file_mode_; }
  unsigned threads() const { return threads_; }
  // The transport requests come through: "ring" (FUSE over io_uring, every queue
  // registered) or "legacy" (/dev/fuse only).
  // Safe from any thread (the control socket's status).
  const char* transport() const {
    FuseRing* r = ring_view_.load(std::memory_order_acquire);
    return r && r->active() ? "ring" : "legacy";
  }
  // The mountpoint's attributes from before the mount (stat on it after the
  // mount would ask this very filesystem and deadlock).
  const struct stat& mountpoint_stat() const { return mountpoint_st_; }

 private:
  Status StartRing();

  ServerOptions opts_;
  std::vector<Export*> exports_;
  bool file_mode_ = false;
  unsigned threads_ = 1;
  fuse_session* se_ = nullptr;
  std::unique_ptr<FuseRing> ring_;              // Run()'s thread only
  std::atomic<FuseRing*> ring_view_{nullptr};  // ring_ for transport(), from any thread
  bool mounted_ = false;
  struct stat mountpoint_st_ {};
};

}  // namespace qcowfs::fuse
