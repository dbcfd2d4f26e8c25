// The LD_PRELOAD fault library (tests/support/sync_fault_preload.c) for tests that run
// the real daemon: where it is, and the environment that loads it.
#pragma once

#include <unistd.h>

#include <cstdlib>
#include <map>
#include <optional>
#include <string>

#include "support/process.h"

namespace qcowfs::testing {

inline std::string SyncFaultPreloadPath() {
  const char* env = getenv("QCOWFS_SYNC_FAULT_PRELOAD");
#ifdef QCOWFS_SYNC_FAULT_PRELOAD
  std::string p = env != nullptr && *env != '\0' ? env : QCOWFS_SYNC_FAULT_PRELOAD;
#else
  std::string p = env != nullptr ? env : "";
#endif
  if (p.empty() || access(p.c_str(), R_OK) != 0)
    SkipOrFail("sync fault preload library not found (build qcowfs_sync_fault_preload): " + p);
  return p;
}

// LD_PRELOAD for a child; an ASan daemon wants its runtime first in the library list, so
// its link-order check is turned off.
inline void AddSyncFaultPreload(std::map<std::string, std::optional<std::string>>* env, const std::string& lib) {
  (*env)["LD_PRELOAD"] = lib;
  const char* asan = getenv("ASAN_OPTIONS");
  (*env)["ASAN_OPTIONS"] =
      std::string(asan != nullptr && *asan != '\0' ? std::string(asan) + ":" : "") + "verify_asan_link_order=0";
}

}  // namespace qcowfs::testing
