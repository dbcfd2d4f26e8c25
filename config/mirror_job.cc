#include "config/mirror_job.h"

#include <nlohmann/json.hpp>

#include "util/size.h"

namespace qcowfs::config {
namespace {

using nlohmann::json;

class KeyPath {
 public:
  KeyPath(std::string file, std::string where) : file_(std::move(file)), where_(std::move(where)) {}
  std::string Of(const std::string& key) const { return where_.empty() ? key : where_ + "." + key; }
  Status Error(const std::string& key, const std::string& what) const {
    return Status::Invalid((file_.empty() ? "" : file_ + ": ") + Of(key) + ": " + what);
  }

 private:
  std::string file_, where_;
};

Result<std::string> String(const json& v, const KeyPath& kp, const std::string& key) {
  if (!v.is_string()) return kp.Error(key, "must be a string");
  return v.get<std::string>();
}

Result<bool> Bool(const json& v, const KeyPath& kp, const std::string& key) {
  if (!v.is_boolean()) return kp.Error(key, "must be true or false");
  return v.get<bool>();
}

Result<uint64_t> Size(const json& v, const KeyPath& kp, const std::string& key) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_string()) {
    auto r = ParseSize(v.get<std::string>());
    if (!r.ok()) return kp.Error(key, r.status().message());
    return r.value();
  }
  return kp.Error(key, "must be a size (bytes, or a string such as \"64K\")");
}

Status ParseTarget(const json& t, const KeyPath& kp, MirrorTarget* out) {
  if (!t.is_object()) return kp.Error("target", "must be an object with \"path\" or \"nbd\"");
  bool has_path = t.contains("path"), has_nbd = t.contains("nbd");
  if (has_path == has_nbd) return kp.Error("target", "needs exactly one of \"path\" and \"nbd\"");
  out->kind = has_nbd ? MirrorTarget::Kind::kNbd : MirrorTarget::Kind::kFile;
  for (auto it = t.begin(); it != t.end(); ++it) {
    const std::string key = "target." + it.key();
    const json& v = it.value();
    if (it.key() == "path") {
      ASSIGN_OR_RETURN(out->path, String(v, kp, key));
      if (out->path.empty()) return kp.Error(key, "must not be empty");
    } else if (it.key() == "nbd") {
      ASSIGN_OR_RETURN(out->nbd_uri, String(v, kp, key));
      const std::string& u = out->nbd_uri;
      if (u.rfind("nbd://", 0) != 0 && u.rfind("nbd+unix://", 0) != 0)
        return kp.Error(key, "must be an nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH URI");
    } else if (has_nbd) {
      return kp.Error(key, "unknown key for an NBD target (it takes only \"nbd\")");
    } else if (it.key() == "format") {
      ASSIGN_OR_RETURN(std::string f, String(v, kp, key));
      if (f == "qcow2") out->format = MirrorTarget::Format::kQcow2;
      else if (f == "raw") out->format = MirrorTarget::Format::kRaw;
      else return kp.Error(key, "must be \"qcow2\" or \"raw\" (got \"" + f + "\")");
    } else if (it.key() == "existing") {
      ASSIGN_OR_RETURN(out->existing, Bool(v, kp, key));
    } else if (it.key() == "backing") {
      ASSIGN_OR_RETURN(out->backing, String(v, kp, key));
      if (out->backing.empty()) return kp.Error(key, "must not be empty");
    } else {
      return kp.Error(key, "unknown key");
    }
  }
  return Status::Ok();
}

}  // namespace

const char* ModeName(MirrorJobConfig::Mode m) {
  return m == MirrorJobConfig::Mode::kBackground ? "background" : "write-blocking";
}
const char* SyncName(MirrorJobConfig::Sync s) { return s == MirrorJobConfig::Sync::kFull ? "full" : "top"; }

Result<MirrorJobConfig> ParseMirrorJob(const std::string& json_text, const std::string& file,
                                       const std::string& where) {
  KeyPath kp(file, where);
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    return Status::Invalid((file.empty() ? "" : file + ": ") + (where.empty() ? "job" : where) +
                           ": invalid JSON: " + e.what());
  }
  if (!j.is_object())
    return Status::Invalid((file.empty() ? "" : file + ": ") + (where.empty() ? "job" : where) +
                           ": must be a JSON object");
  MirrorJobConfig job;
  bool has_target = false, has_buf = false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    if (k == "id") {
      ASSIGN_OR_RETURN(job.id, String(v, kp, k));
      if (job.id.empty()) return kp.Error(k, "must not be empty");
      for (char c : job.id)
        if (static_cast<unsigned char>(c) < 0x20) return kp.Error(k, "must not contain control characters");
    } else if (k == "image") {
      ASSIGN_OR_RETURN(job.image, String(v, kp, k));
    } else if (k == "target") {
      RETURN_IF_ERROR(ParseTarget(v, kp, &job.target));
      has_target = true;
    } else if (k == "mode") {
      ASSIGN_OR_RETURN(std::string m, String(v, kp, k));
      if (m == "background") job.mode = MirrorJobConfig::Mode::kBackground;
      else if (m == "write-blocking") job.mode = MirrorJobConfig::Mode::kWriteBlocking;
      else return kp.Error(k, "must be \"background\" or \"write-blocking\" (got \"" + m + "\")");
    } else if (k == "copy_on_read") {
      ASSIGN_OR_RETURN(job.copy_on_read, Bool(v, kp, k));
    } else if (k == "sync") {
      ASSIGN_OR_RETURN(std::string s, String(v, kp, k));
      if (s == "full") job.sync = MirrorJobConfig::Sync::kFull;
      else if (s == "top") job.sync = MirrorJobConfig::Sync::kTop;
      else return kp.Error(k, "must be \"full\" or \"top\" (got \"" + s + "\")");
    } else if (k == "granularity") {
      ASSIGN_OR_RETURN(job.granularity, Size(v, kp, k));
      uint64_t g = job.granularity;
      if (g < kMinGranularity || g > kMaxGranularity || (g & (g - 1)))
        return kp.Error(k, "must be a power of two from 4K to 64M");
    } else if (k == "buf_size") {
      ASSIGN_OR_RETURN(job.buf_size, Size(v, kp, k));
      has_buf = true;
      if (job.buf_size < kMinGranularity || job.buf_size > (1ull << 30))
        return kp.Error(k, "must be from 4K to 1G");
    } else if (k == "speed") {
      ASSIGN_OR_RETURN(job.speed, Size(v, kp, k));
    } else if (k == "target_timeout") {
      if (!v.is_number_unsigned() || v.get<uint64_t>() == 0 || v.get<uint64_t>() > 3600)
        return kp.Error(k, "must be a number of seconds from 1 to 3600");
      job.target_timeout_s = v.get<uint32_t>();
    } else {
      return kp.Error(k, "unknown key");
    }
  }
  if (!has_target) return kp.Error("target", "is required");
  if (has_buf && job.granularity && job.buf_size < job.granularity)
    return kp.Error("buf_size", "must be at least the granularity");
  if (job.sync == MirrorJobConfig::Sync::kTop &&
      (job.target.kind != MirrorTarget::Kind::kFile || job.target.format != MirrorTarget::Format::kQcow2 ||
       job.target.existing))
    return kp.Error("sync", "\"top\" needs a new qcow2 file target");
  if (!job.target.backing.empty() && job.sync != MirrorJobConfig::Sync::kTop)
    return kp.Error("target.backing", "is only for sync \"top\"");
  return job;
}

std::string MirrorTargetToJson(const MirrorTarget& t) {
  json j = json::object();
  if (t.kind == MirrorTarget::Kind::kNbd) {
    j["nbd"] = t.nbd_uri;
  } else {
    j["path"] = t.path;
    j["format"] = t.format == MirrorTarget::Format::kQcow2 ? "qcow2" : "raw";
    j["existing"] = t.existing;
    if (!t.backing.empty()) j["backing"] = t.backing;
  }
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string MirrorJobToJson(const MirrorJobConfig& job) {
  json j = json::object();
  if (!job.id.empty()) j["id"] = job.id;
  if (!job.image.empty()) j["image"] = job.image;
  j["target"] = json::parse(MirrorTargetToJson(job.target));
  j["mode"] = ModeName(job.mode);
  j["copy_on_read"] = job.copy_on_read;
  j["sync"] = SyncName(job.sync);
  if (job.granularity) j["granularity"] = job.granularity;
  j["buf_size"] = job.buf_size;
  j["speed"] = job.speed;
  j["target_timeout"] = job.target_timeout_s;
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

bool operator==(const MirrorTarget& a, const MirrorTarget& b) {
  return a.kind == b.kind && a.path == b.path && a.format == b.format && a.existing == b.existing &&
         a.backing == b.backing && a.nbd_uri == b.nbd_uri;
}

bool operator==(const MirrorJobConfig& a, const MirrorJobConfig& b) {
  return a.id == b.id && a.image == b.image && a.target == b.target && a.mode == b.mode &&
         a.copy_on_read == b.copy_on_read && a.sync == b.sync && a.granularity == b.granularity &&
         a.buf_size == b.buf_size && a.speed == b.speed && a.target_timeout_s == b.target_timeout_s;
}

}  // namespace qcowfs::config
