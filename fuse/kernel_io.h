// KernelIo: the /dev/fuse reads and writes of the session, through libfuse's
// custom-io hook, so that open replies can carry FOPEN_PARALLEL_DIRECT_WRITES
// (libfuse 3.14 has no field for it). With it the kernel runs direct writes to
// one file in parallel instead of under the inode lock; reads already are.
#pragma once

struct fuse_session;

namespace qcowfs::fuse {

// Installs the hook on a mounted session. Returns false if libfuse refuses.
bool InstallKernelIo(fuse_session* se);

}  // namespace qcowfs::fuse
