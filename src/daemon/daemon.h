// The mount daemon: opens the images, mounts, detaches, serves the control
// socket, and on unmount/SIGTERM/SIGINT closes every image clean.
#pragma once

#include "config/config.h"

namespace qcowfs::daemon {

// Returns the process exit code (0 clean stop, 1 runtime error). Prints one
// line on stderr for each error that stops the mount.
int RunMount(const config::MountConfig& cfg);

}  // namespace qcowfs::daemon
