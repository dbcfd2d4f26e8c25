// A mirror job (SPEC §6) as a typed struct: parsed from the mount config's "mirrors"
// entries and from `mirror-start` requests. Errors name the key path
// (mirrors[0].granularity, target.path, ...). mirror/ sees only these structs.
#pragma once

#include <cstdint>
#include <string>

#include "util/status.h"

namespace qcowfs::config {

struct MirrorTarget {
  enum class Kind { kFile, kNbd };
  enum class Format { kQcow2, kRaw };
  Kind kind = Kind::kFile;
  std::string path;         // kFile
  Format format = Format::kQcow2;
  bool existing = false;    // kFile: use an existing file of exactly the source's size
  std::string backing;      // kFile, sync top: the new qcow2's backing file (default: the source's)
  std::string nbd_uri;      // kNbd: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH
};

struct MirrorJobConfig {
  enum class Mode { kBackground, kWriteBlocking };
  enum class Sync { kFull, kTop };
  std::string id;           // empty: the daemon names it job0, job1, ...
  std::string image;        // exposed file name; empty: the only image
  MirrorTarget target;
  Mode mode = Mode::kBackground;
  bool copy_on_read = false;
  Sync sync = Sync::kFull;
  uint64_t granularity = 0;  // 0: the source's cluster size clamped to 4K..64K
  uint64_t buf_size = 16ull << 20;
  uint64_t speed = 0;        // bytes per second of copied data; 0: unlimited
  uint32_t target_timeout_s = 10;
};

inline constexpr uint64_t kMinGranularity = 4096;
inline constexpr uint64_t kMaxGranularity = 64ull << 20;

// Parses one job given as JSON text. `where` prefixes key paths in messages ("" for a
// request, "mirrors[0]" in a config), `file` names the file ("" for a request).
Result<MirrorJobConfig> ParseMirrorJob(const std::string& json_text, const std::string& file = "",
                                       const std::string& where = "");
// The job as JSON (every key, canonical values): what status reports as the job's
// target and settings; ParseMirrorJob reads it back to the same struct.
std::string MirrorJobToJson(const MirrorJobConfig& job);
std::string MirrorTargetToJson(const MirrorTarget& t);
bool operator==(const MirrorTarget& a, const MirrorTarget& b);
bool operator==(const MirrorJobConfig& a, const MirrorJobConfig& b);

const char* ModeName(MirrorJobConfig::Mode m);
const char* SyncName(MirrorJobConfig::Sync s);

}  // namespace qcowfs::config
