// Creating empty qcow2 images (qcowfs create, mirror targets, tests).
#pragma once

#include <cstdint>
#include <string>

#include "block/block_device.h"
#include "util/status.h"

namespace qcowfs::qcow2 {

struct CreateOptions {
  uint64_t size = 0;
  uint32_t cluster_bits = 16;
  uint32_t version = 3;
  uint32_t refcount_order = 4;
  bool lazy_refcounts = false;
  bool extended_l2 = false;
  std::string backing_file;    // as stored in the header (relative or absolute)
  std::string backing_format;  // "qcow2", "raw" or empty
  std::string data_file;       // external data file name, stored as given
  bool data_file_raw = false;
  // fdatasync the new image before returning. A mirror target skips it: the job flushes
  // the target before it is ready, and a target is not usable before that anyway.
  bool sync = true;
};

// Writes a new empty image onto host (which must be empty or truncatable).
Status CreateOn(block::BlockDevice* host, const CreateOptions& opts);
// Creates path (fails if it exists) and writes a new empty image into it.
Status CreateFile(const std::string& path, const CreateOptions& opts);

}  // namespace qcowfs::qcow2
