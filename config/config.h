// Typed mount configuration: JSON config files and -o option lists become these
// structs. Errors name the key path (images[0].path) or the line and column.
// The only place besides main.cc that includes nlohmann/json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/mirror_job.h"
#include "util/status.h"

namespace qcowfs::config {

struct ImageConfig {
  std::string name;  // exposed file name (directory mode); default STEM.raw
  std::string path;
  bool read_only = false;
  bool discard_unmap = true;
  uint64_t cache_size = 32ull << 20;
  // cache "none": the image, its backing files and its data file with O_DIRECT;
  // "writeback" (false, the default): through the host page cache.
  bool cache_none = false;
};

// Upper bound of poll_us: polling longer than 10 ms only burns CPU.
inline constexpr uint32_t kMaxPollUs = 10000;

struct MountConfig {
  std::string mountpoint;
  std::vector<ImageConfig> images;
  unsigned threads = 0;  // 0: CPU count
  uint32_t poll_us = 50;  // FUSE device polling before a worker sleeps (0: none)
  std::string transport = "auto";  // FUSE transport: auto, legacy (/dev/fuse) or ring (io_uring)
  bool allow_other = false;
  std::string socket;    // empty: the default path for the mountpoint
  bool foreground = false;
  bool debug = false;
  std::vector<MirrorJobConfig> mirrors;  // jobs started at mount
};

// Parses a config file's text. `file` names it in messages.
Result<MountConfig> ParseMountConfig(const std::string& text, const std::string& file);
Result<MountConfig> LoadMountConfig(const std::string& file);

// Whether s names a FUSE transport: auto, legacy or ring.
bool ValidTransport(const std::string& s);

// Overrides from a comma-separated -o list (ro, rw, allow_other, threads=N, poll_us=N, transport=T,
// cache_size=SIZE, cache=none|writeback, discard=unmap|ignore, socket=PATH, read_only, ...). Generic
// mount options that mount(8) passes (dev, suid, exec, atime, _netdev, ...) are
// accepted and ignored. Unknown names are errors.
Status ApplyOptionList(const std::string& list, MountConfig* cfg);

// "none" -> true, "writeback" -> false; anything else is an error naming `where`.
Result<bool> ParseCacheMode(const std::string& v, const std::string& where);

// "disk.qcow2" -> "disk.raw".
std::string DefaultExportName(const std::string& image_path);

// Default control socket: $XDG_RUNTIME_DIR/qcowfs/ESC.sock or /run/qcowfs/ESC.sock,
// ESC being the absolute mountpoint escaped like `systemd-escape --path`.
std::string DefaultSocketPath(const std::string& abs_mountpoint);
std::string SystemdEscapePath(const std::string& abs_path);

}  // namespace qcowfs::config
