#include "config/control_protocol.h"

#include <nlohmann/json.hpp>

#include "util/size.h"

namespace qcowfs::config {

using nlohmann::json;

namespace {
// Text from the outside (paths, names) may not be UTF-8: replace, never throw.
std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }
}  // namespace

Result<ControlRequest> ParseControlRequest(const std::string& line) {
  json j;
  try {
    j = json::parse(line);
  } catch (const json::exception& e) {
    return Status::Invalid("malformed request: not valid JSON");
  }
  if (!j.is_object()) return Status::Invalid("malformed request: expected a JSON object");
  ControlRequest r;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "cmd") {
      if (!it.value().is_string()) return Status::Invalid("malformed request: \"cmd\" must be a string");
      r.cmd = it.value().get<std::string>();
    } else if (it.key() == "args") {
      if (!it.value().is_object()) return Status::Invalid("malformed request: \"args\" must be an object");
      r.args_json = Dump(it.value());
    } else {
      return Status::Invalid("malformed request: unknown key \"" + it.key() + "\"");
    }
  }
  if (r.cmd.empty()) return Status::Invalid("malformed request: \"cmd\" is required");
  return r;
}

std::string FormatOkReply(const std::string& result_json) {
  json j;
  j["ok"] = true;
  j["result"] = json::parse(result_json);
  return Dump(j) + "\n";
}

std::string FormatErrorReply(const std::string& error) {
  json j;
  j["ok"] = false;
  j["error"] = error;
  return Dump(j) + "\n";
}

std::string FormatRequest(const std::string& cmd, const std::string& args_json) {
  json j;
  j["cmd"] = cmd;
  j["args"] = json::parse(args_json);
  return Dump(j) + "\n";
}

Result<std::string> ParseReply(const std::string& line) {
  try {
    json j = json::parse(line);
    if (!j.is_object() || !j.contains("ok")) return Status::IoError("malformed reply from the daemon");
    if (j["ok"].get<bool>()) return j.contains("result") ? Dump(j["result"]) : std::string("null");
    return Status::IoError(j.value("error", std::string("unknown error")));
  } catch (const json::exception&) {
    return Status::IoError("malformed reply from the daemon");
  }
}

std::string StatusToJson(const StatusReport& r) {
  json j;
  j["mountpoint"] = r.mountpoint;
  j["pid"] = r.pid;
  j["threads"] = r.threads;
  j["transport"] = r.transport;
  json imgs = json::array();
  for (const auto& i : r.images) {
    imgs.push_back({{"name", i.name},
                    {"path", i.path},
                    {"virtual_size", i.virtual_size},
                    {"allocated_bytes", i.allocated_bytes},
                    {"read_only", i.read_only},
                    {"corrupt", i.corrupt},
                    {"cache_mode", i.cache_mode},
                    {"cache", {{"l2_hits", i.l2_hits}, {"l2_misses", i.l2_misses},
                               {"refblock_hits", i.refblock_hits}, {"refblock_misses", i.refblock_misses}}},
                    {"in_flight", i.in_flight},
                    {"requests", {{"reads", i.reads}, {"writes", i.writes}, {"discards", i.discards},
                                  {"flushes", i.flushes}}}});
  }
  j["images"] = imgs;
  json mirrors = json::array();
  for (const auto& m : r.mirrors) mirrors.push_back(json::parse(MirrorReportToJson(m)));
  j["mirrors"] = mirrors;
  return Dump(j);
}

std::string MirrorReportToJson(const MirrorReport& m) {
  json t;
  try {
    t = json::parse(m.target_json);
  } catch (const json::exception&) {
    t = json::object();
  }
  json j = {{"id", m.id},
            {"image", m.image},
            {"target", t},
            {"mode", m.mode},
            {"sync", m.sync},
            {"copy_on_read", m.copy_on_read},
            {"granularity", m.granularity},
            {"state", m.state},
            {"bytes_done", m.bytes_done},
            {"bytes_total", m.bytes_total},
            {"dirty_bytes", m.dirty_bytes},
            {"speed", m.speed},
            {"speed_bps", m.speed_bps},
            {"actively_synced", m.actively_synced},
            {"error", m.error}};
  return Dump(j);
}

Result<MirrorReport> MirrorReportFromJson(const std::string& text) {
  try {
    json j = json::parse(text);
    MirrorReport m;
    m.id = j.at("id").get<std::string>();
    m.image = j.at("image").get<std::string>();
    m.target_json = Dump(j.at("target"));
    m.mode = j.at("mode").get<std::string>();
    m.sync = j.at("sync").get<std::string>();
    m.copy_on_read = j.at("copy_on_read").get<bool>();
    m.granularity = j.at("granularity").get<uint64_t>();
    m.state = j.at("state").get<std::string>();
    m.bytes_done = j.at("bytes_done").get<uint64_t>();
    m.bytes_total = j.at("bytes_total").get<uint64_t>();
    m.dirty_bytes = j.at("dirty_bytes").get<uint64_t>();
    m.speed = j.at("speed").get<uint64_t>();
    m.speed_bps = j.at("speed_bps").get<uint64_t>();
    m.actively_synced = j.at("actively_synced").get<bool>();
    m.error = j.at("error").get<std::string>();
    return m;
  } catch (const json::exception& e) {
    return Status::IoError(std::string("malformed mirror status: ") + e.what());
  }
}

std::string MirrorReportToText(const MirrorReport& m) {
  uint64_t pct = m.bytes_total ? std::min<uint64_t>(100, m.bytes_done * 100 / m.bytes_total) : (m.state == "running" ? 0 : 100);
  char rate[32];
  snprintf(rate, sizeof(rate), "%.1f MiB/s", static_cast<double>(m.speed_bps) / (1 << 20));
  std::string eta = "-";
  if (m.speed_bps > 0 && m.bytes_total > m.bytes_done) {
    uint64_t s = (m.bytes_total - m.bytes_done) / m.speed_bps;
    char b[32];
    snprintf(b, sizeof(b), "%llu:%02llu", static_cast<unsigned long long>(s / 60), static_cast<unsigned long long>(s % 60));
    eta = b;
  }
  std::string out = m.id + " " + m.state + " " + std::to_string(pct) + "% " + rate + " ETA " + eta;
  if (m.actively_synced) out += " actively-synced";
  if (!m.error.empty()) out += " error: " + m.error;
  return out;
}

Result<StatusReport> StatusFromJson(const std::string& text) {
  try {
    json j = json::parse(text);
    StatusReport r;
    r.mountpoint = j.at("mountpoint").get<std::string>();
    r.pid = j.at("pid").get<int64_t>();
    r.threads = j.at("threads").get<unsigned>();
    r.transport = j.value("transport", std::string());  // absent from daemons before it
    for (const auto& i : j.at("images")) {
      ImageReport ir;
      ir.name = i.at("name").get<std::string>();
      ir.path = i.at("path").get<std::string>();
      ir.virtual_size = i.at("virtual_size").get<uint64_t>();
      ir.allocated_bytes = i.at("allocated_bytes").get<uint64_t>();
      ir.read_only = i.at("read_only").get<bool>();
      ir.corrupt = i.at("corrupt").get<bool>();
      ir.cache_mode = i.value("cache_mode", std::string("writeback"));
      ir.l2_hits = i.at("cache").at("l2_hits").get<uint64_t>();
      ir.l2_misses = i.at("cache").at("l2_misses").get<uint64_t>();
      ir.refblock_hits = i.at("cache").at("refblock_hits").get<uint64_t>();
      ir.refblock_misses = i.at("cache").at("refblock_misses").get<uint64_t>();
      ir.in_flight = i.at("in_flight").get<uint64_t>();
      ir.reads = i.at("requests").at("reads").get<uint64_t>();
      ir.writes = i.at("requests").at("writes").get<uint64_t>();
      ir.discards = i.at("requests").at("discards").get<uint64_t>();
      ir.flushes = i.at("requests").at("flushes").get<uint64_t>();
      r.images.push_back(ir);
    }
    if (j.contains("mirrors"))
      for (const auto& m : j.at("mirrors")) {
        ASSIGN_OR_RETURN(MirrorReport mr, MirrorReportFromJson(Dump(m)));
        r.mirrors.push_back(mr);
      }
    return r;
  } catch (const json::exception& e) {
    return Status::IoError(std::string("malformed status reply: ") + e.what());
  }
}

std::string StatusToText(const StatusReport& r) {
  std::string out = "mountpoint: " + r.mountpoint + "\npid: " + std::to_string(r.pid) +
                    "\nthreads: " + std::to_string(r.threads) + "\n";
  if (!r.transport.empty()) out += "transport: " + r.transport + (r.transport == "ring" ? " (FUSE over io_uring)\n" : " (/dev/fuse)\n");
  for (const auto& i : r.images) {
    out += "image " + i.name + " (" + i.path + ")" + (i.read_only ? " read-only" : "") +
           (i.corrupt ? " CORRUPT" : "") + "\n";
    out += "  virtual size: " + FormatSize(i.virtual_size) + "\n";
    out += "  cache: " + (i.cache_mode == "none" ? std::string("none (O_DIRECT)") : i.cache_mode) + "\n";
    out += "  allocated: " + FormatSize(i.allocated_bytes) + "\n";
    out += "  metadata cache: L2 " + std::to_string(i.l2_hits) + " hits / " + std::to_string(i.l2_misses) +
           " misses, refcount " + std::to_string(i.refblock_hits) + " hits / " +
           std::to_string(i.refblock_misses) + " misses\n";
    out += "  in flight: " + std::to_string(i.in_flight) + "\n";
    out += "  requests: " + std::to_string(i.reads) + " reads, " + std::to_string(i.writes) + " writes, " +
           std::to_string(i.discards) + " discards, " + std::to_string(i.flushes) + " flushes\n";
  }
  for (const auto& m : r.mirrors) out += "mirror " + m.image + ": " + MirrorReportToText(m) + "\n";
  return out;
}

}  // namespace qcowfs::config
