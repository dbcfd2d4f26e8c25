#include "config/config.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/size.h"

namespace qcowfs::config {
namespace {

using nlohmann::json;

std::string LineColumn(const std::string& text, size_t byte) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < byte && i < text.size(); i++) {
    if (text[i] == '\n') {
      line++;
      col = 1;
    } else {
      col++;
    }
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col > 1 ? col - 1 : 1);
}

Status KeyError(const std::string& file, const std::string& key, const std::string& what) {
  return Status::Invalid(file + ": " + key + ": " + what);
}

Result<uint64_t> SizeValue(const json& v, const std::string& file, const std::string& key) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_string()) {
    auto r = ParseSize(v.get<std::string>());
    if (!r.ok()) return KeyError(file, key, r.status().message());
    return r.value();
  }
  return KeyError(file, key, "must be a size (bytes, or a string such as \"32M\")");
}

Result<bool> BoolValue(const json& v, const std::string& file, const std::string& key) {
  if (!v.is_boolean()) return KeyError(file, key, "must be true or false");
  return v.get<bool>();
}

Result<std::string> StringValue(const json& v, const std::string& file, const std::string& key) {
  if (!v.is_string()) return KeyError(file, key, "must be a string");
  return v.get<std::string>();
}

Result<bool> DiscardValue(const std::string& v, const std::string& where) {
  if (v == "unmap") return true;
  if (v == "ignore") return false;
  return Status::Invalid(where + ": must be \"unmap\" or \"ignore\" (got \"" + v + "\")");
}

}  // namespace

Result<bool> ParseCacheMode(const std::string& v, const std::string& where) {
  if (v == "none") return true;
  if (v == "writeback") return false;
  return Status::Invalid(where + ": must be \"none\" or \"writeback\" (got \"" + v + "\")");
}

std::string DefaultExportName(const std::string& image_path) {
  std::string base = image_path.substr(image_path.rfind('/') == std::string::npos ? 0 : image_path.rfind('/') + 1);
  auto dot = base.rfind('.');
  if (dot != std::string::npos && dot > 0) base = base.substr(0, dot);
  return base + ".raw";
}

std::string SystemdEscapePath(const std::string& abs_path) {
  std::string p = abs_path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  size_t start = 0;
  while (start < p.size() && p[start] == '/') start++;
  p = p.substr(start);
  if (p.empty()) return "-";
  std::string out;
  for (size_t i = 0; i < p.size(); i++) {
    char c = p[i];
    if (c == '/') {
      out += '-';
    } else if ((i == 0 && c == '.') ||
               !(isalnum(static_cast<unsigned char>(c)) || c == ':' || c == '_' || c == '.')) {
      char buf[8];
      snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned char>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out;
}

std::string DefaultSocketPath(const std::string& abs_mountpoint) {
  const char* xdg = getenv("XDG_RUNTIME_DIR");
  std::string dir = (xdg && *xdg) ? std::string(xdg) + "/qcowfs" : "/run/qcowfs";
  return dir + "/" + SystemdEscapePath(abs_mountpoint) + ".sock";
}

Result<MountConfig> ParseMountConfig(const std::string& text, const std::string& file) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    std::string msg = e.what();
    auto pos = msg.find("syntax error");
    return Status::Invalid(file + ": invalid JSON at " + LineColumn(text, e.byte) + ": " +
                           (pos != std::string::npos ? msg.substr(pos) : msg));
  } catch (const json::exception& e) {  // e.g. a number out of range
    return Status::Invalid(file + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) return Status::Invalid(file + ": the config must be a JSON object");
  MountConfig cfg;
  // The top-level "cache" is the default of every image that has no "cache" of its own.
  bool top_cache_none = false;
  std::vector<bool> image_sets_cache;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    if (k == "mountpoint") {
      ASSIGN_OR_RETURN(cfg.mountpoint, StringValue(v, file, k));
    } else if (k == "threads") {
      if (!v.is_number_unsigned() || v.get<uint64_t>() == 0 || v.get<uint64_t>() > 1024)
        return KeyError(file, k, "must be a number from 1 to 1024");
      cfg.threads = v.get<unsigned>();
    } else if (k == "poll_us") {
      if (!v.is_number_unsigned() || v.get<uint64_t>() > kMaxPollUs)
        return KeyError(file, k, "must be a number of microseconds from 0 to " + std::to_string(kMaxPollUs));
      cfg.poll_us = v.get<uint32_t>();
    } else if (k == "transport") {
      ASSIGN_OR_RETURN(cfg.transport, StringValue(v, file, k));
      if (!ValidTransport(cfg.transport)) return KeyError(file, k, "must be \"auto\", \"legacy\" or \"ring\"");
    } else if (k == "allow_other") {
      ASSIGN_OR_RETURN(cfg.allow_other, BoolValue(v, file, k));
    } else if (k == "socket") {
      ASSIGN_OR_RETURN(cfg.socket, StringValue(v, file, k));
    } else if (k == "cache") {
      ASSIGN_OR_RETURN(std::string c, StringValue(v, file, k));
      ASSIGN_OR_RETURN(top_cache_none, ParseCacheMode(c, file + ": " + k));
    } else if (k == "mirrors") {
      if (!v.is_array()) return KeyError(file, k, "must be an array of mirror jobs");
      for (size_t i = 0; i < v.size(); i++) {
        std::string where = k + "[" + std::to_string(i) + "]";
        if (!v[i].is_object()) return KeyError(file, where, "must be an object");
        ASSIGN_OR_RETURN(MirrorJobConfig job,
                         ParseMirrorJob(v[i].dump(-1, ' ', false, json::error_handler_t::replace), file, where));
        cfg.mirrors.push_back(job);
      }
    } else if (k == "images") {
      if (!v.is_array() || v.empty()) return KeyError(file, k, "must be a non-empty array of images");
      for (size_t i = 0; i < v.size(); i++) {
        std::string base = "images[" + std::to_string(i) + "]";
        const json& im = v[i];
        if (!im.is_object()) return KeyError(file, base, "must be an object");
        ImageConfig ic;
        bool sets_cache = false;
        for (auto jt = im.begin(); jt != im.end(); ++jt) {
          const std::string key = base + "." + jt.key();
          if (jt.key() == "name") {
            ASSIGN_OR_RETURN(ic.name, StringValue(jt.value(), file, key));
            if (ic.name.empty() || ic.name.find('/') != std::string::npos || ic.name == "." || ic.name == "..")
              return KeyError(file, key, "must be a plain file name");
          } else if (jt.key() == "path") {
            ASSIGN_OR_RETURN(ic.path, StringValue(jt.value(), file, key));
          } else if (jt.key() == "read_only") {
            ASSIGN_OR_RETURN(ic.read_only, BoolValue(jt.value(), file, key));
          } else if (jt.key() == "discard") {
            ASSIGN_OR_RETURN(std::string d, StringValue(jt.value(), file, key));
            auto r = DiscardValue(d, file + ": " + key);
            if (!r.ok()) return r.status();
            ic.discard_unmap = r.value();
          } else if (jt.key() == "cache_size") {
            ASSIGN_OR_RETURN(ic.cache_size, SizeValue(jt.value(), file, key));
          } else if (jt.key() == "cache") {
            ASSIGN_OR_RETURN(std::string c, StringValue(jt.value(), file, key));
            ASSIGN_OR_RETURN(ic.cache_none, ParseCacheMode(c, file + ": " + key));
            sets_cache = true;
          } else {
            return KeyError(file, key, "unknown key");
          }
        }
        if (ic.path.empty()) return KeyError(file, base + ".path", "is required");
        if (ic.name.empty()) ic.name = DefaultExportName(ic.path);
        for (const auto& other : cfg.images)
          if (other.name == ic.name) return KeyError(file, base + ".name", "duplicate name \"" + ic.name + "\"");
        cfg.images.push_back(ic);
        image_sets_cache.push_back(sets_cache);
      }
    } else {
      return KeyError(file, k, "unknown key");
    }
  }
  if (cfg.images.empty()) return KeyError(file, "images", "is required");
  for (size_t i = 0; i < cfg.images.size(); i++)
    if (!image_sets_cache[i]) cfg.images[i].cache_none = top_cache_none;
  return cfg;
}

Result<MountConfig> LoadMountConfig(const std::string& file) {
  std::ifstream in(file);
  if (!in) return Status::Error(ENOENT, file + ": cannot read the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseMountConfig(ss.str(), file);
}

bool ValidTransport(const std::string& s) { return s == "auto" || s == "legacy" || s == "ring"; }

Status ApplyOptionList(const std::string& list, MountConfig* cfg) {
  static const char* kIgnored[] = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime",
                                   "noatime", "relatime", "norelatime", "strictatime", "diratime",
                                   "nodiratime", "sync", "async", "auto", "noauto", "user", "nouser",
                                   "users", "_netdev", "defaults", "nofail", "lazytime", "nolazytime",
                                   "default_permissions"};
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    auto eq = item.find('=');
    std::string k = item.substr(0, eq), v = eq == std::string::npos ? "" : item.substr(eq + 1);
    std::replace(k.begin(), k.end(), '-', '_');
    bool ignored = k.rfind("x-", 0) == 0 || k.rfind("comment", 0) == 0;
    for (const char* ig : kIgnored) ignored |= k == ig;
    if (k == "rw") {
      for (auto& im : cfg->images) im.read_only = false;
    } else if (ignored) {
      continue;
    } else if (k == "ro" || k == "read_only") {
      for (auto& im : cfg->images) im.read_only = true;
    } else if (k == "allow_other") {
      cfg->allow_other = true;
    } else if (k == "threads") {
      char* end = nullptr;
      unsigned long n = strtoul(v.c_str(), &end, 10);
      if (v.empty() || *end || n == 0 || n > 1024) return Status::Invalid("-o threads: must be a number from 1 to 1024");
      cfg->threads = static_cast<unsigned>(n);
    } else if (k == "poll_us") {
      char* end = nullptr;
      unsigned long n = strtoul(v.c_str(), &end, 10);
      if (v.empty() || *end || n > kMaxPollUs)
        return Status::Invalid("-o poll_us: must be a number of microseconds from 0 to " + std::to_string(kMaxPollUs));
      cfg->poll_us = static_cast<uint32_t>(n);
    } else if (k == "transport") {
      if (!ValidTransport(v)) return Status::Invalid("-o transport: must be auto, legacy or ring");
      cfg->transport = v;
    } else if (k == "cache_size") {
      auto r = ParseSize(v);
      if (!r.ok()) return Status::Invalid("-o cache_size: " + r.status().message());
      for (auto& im : cfg->images) im.cache_size = r.value();
    } else if (k == "cache") {
      auto r = ParseCacheMode(v, "-o cache");
      if (!r.ok()) return r.status();
      for (auto& im : cfg->images) im.cache_none = r.value();
    } else if (k == "discard") {
      auto r = DiscardValue(v, "-o discard");
      if (!r.ok()) return r.status();
      for (auto& im : cfg->images) im.discard_unmap = r.value();
    } else if (k == "socket") {
      if (v.empty()) return Status::Invalid("-o socket: needs a path");
      cfg->socket = v;
    } else if (k == "foreground") {
      cfg->foreground = true;
    } else {
      return Status::Invalid("-o: unknown option '" + item + "'");
    }
  }
  return Status::Ok();
}

}  // namespace qcowfs::config
