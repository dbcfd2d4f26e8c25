// Control protocol (SPEC §7): newline-delimited JSON over a Unix socket.
// Request {"cmd": "...", "args": {...}}; reply {"ok": true, "result": ...} or
// {"ok": false, "error": "..."}. This file turns lines into typed values and back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "util/status.h"

namespace qcowfs::config {

struct ControlRequest {
  std::string cmd;
  std::string args_json = "{}";  // the "args" object, as JSON text
};

Result<ControlRequest> ParseControlRequest(const std::string& line);
std::string FormatOkReply(const std::string& result_json);
std::string FormatErrorReply(const std::string& error);
std::string FormatRequest(const std::string& cmd, const std::string& args_json = "{}");
// Splits a reply line: ok -> result JSON text; error -> Status with the message.
Result<std::string> ParseReply(const std::string& line);

struct ImageReport {
  std::string name, path;
  uint64_t virtual_size = 0, allocated_bytes = 0;
  bool read_only = false, corrupt = false;
  std::string cache_mode = "writeback";  // "none": O_DIRECT host files
  uint64_t l2_hits = 0, l2_misses = 0, refblock_hits = 0, refblock_misses = 0;
  uint64_t in_flight = 0, reads = 0, writes = 0, discards = 0, flushes = 0;
};

// One mirror job (SPEC §6 status fields). target_json is the job's target object.
struct MirrorReport {
  std::string id, image, target_json = "{}", mode, sync;
  bool copy_on_read = false;
  uint64_t granularity = 0;
  std::string state;
  uint64_t bytes_done = 0, bytes_total = 0, dirty_bytes = 0, speed = 0, speed_bps = 0;
  bool actively_synced = false;
  std::string error;
};

std::string MirrorReportToJson(const MirrorReport& m);
Result<MirrorReport> MirrorReportFromJson(const std::string& json_text);
// A progress line: "mig1 running 42% 120.5 MiB/s ETA 0:12".
std::string MirrorReportToText(const MirrorReport& m);

struct StatusReport {
  std::string mountpoint;
  int64_t pid = 0;
  unsigned threads = 0;
  std::string transport;  // FUSE transport in use: "ring" (io_uring) or "legacy" (/dev/fuse)
  std::vector<ImageReport> images;
  std::vector<MirrorReport> mirrors;
};

std::string StatusToJson(const StatusReport& r);
Result<StatusReport> StatusFromJson(const std::string& json_text);
// Human-readable status for `qcowfs status`.
std::string StatusToText(const StatusReport& r);

}  // namespace qcowfs::config
