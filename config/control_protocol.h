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
  uint64_t l2_hits = 0, l2_misses = 0, refblock_hits = 0, refblock_misses = 0;
  uint64_t in_flight = 0, reads = 0, writes = 0, discards = 0, flushes = 0;
};

struct StatusReport {
  std::string mountpoint;
  int64_t pid = 0;
  unsigned threads = 0;
  std::vector<ImageReport> images;
};

std::string StatusToJson(const StatusReport& r);
Result<StatusReport> StatusFromJson(const std::string& json_text);
// Human-readable status for `qcowfs status`.
std::string StatusToText(const StatusReport& r);

}  // namespace qcowfs::config
