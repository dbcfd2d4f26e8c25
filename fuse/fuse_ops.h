// The low-level FUSE operation table (noexcept trampolines, one reply each).
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

namespace qcowfs::fuse {

const fuse_lowlevel_ops* Operations();

}  // namespace qcowfs::fuse
