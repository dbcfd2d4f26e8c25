// Opening a mirror job's target (SPEC §6): a new or existing qcow2 or raw file (held
// with QEMU-compatible locks for the job's life), or an NBD export. Every refusal is one
// line naming target.path / target.nbd and the reason, and writes nothing anywhere (a
// file created here is removed again if the open fails later).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/mirror_job.h"
#include "mirror/mirror_job.h"
#include "util/status.h"

namespace qcowfs::mirror {

struct SourceInfo {
  uint64_t size = 0;
  uint32_t cluster_bits = 16;
  std::vector<std::string> files;  // the image and every file of its backing chain (absolute)
  // Sync "top": the new qcow2 target's backing file, stored in its header as given
  // (relative to the target's directory), and its format. Empty: no backing file.
  std::string top_backing;
  std::string top_backing_format;
};

Result<Target> OpenTarget(const config::MirrorTarget& t, const SourceInfo& src, uint32_t timeout_s);

}  // namespace qcowfs::mirror
