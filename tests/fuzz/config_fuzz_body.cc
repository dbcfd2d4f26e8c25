#include "fuzz/config_fuzz_body.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include "config/config.h"
#include "config/control_protocol.h"
#include "config/mirror_job.h"
#include "util/size.h"

namespace qcowfs::fuzz {
namespace {

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "config fuzz: %s\n", what.c_str());
  std::abort();
}

void Size(const std::string& text) {
  auto r = ParseSize(text);
  if (!r.ok()) return;
  (void)FormatSize(r.value());
  // Plain digits parse to themselves.
  auto again = ParseSize(std::to_string(r.value()));
  if (!again.ok() || again.value() != r.value()) Fail("ParseSize does not accept its own decimal output");
}

void MountConfig(const std::string& text) {
  auto r = config::ParseMountConfig(text, "fuzz.json");
  config::MountConfig cfg;
  if (r.ok()) {
    cfg = r.value();
    for (const auto& im : cfg.images) {
      if (im.path.empty() || im.name.empty()) Fail("ParseMountConfig accepted an image without path or name");
      (void)config::DefaultExportName(im.path);
    }
    // Every accepted job reads back the same from its canonical JSON.
    for (const auto& job : cfg.mirrors) {
      auto again = config::ParseMirrorJob(config::MirrorJobToJson(job));
      if (!again.ok()) Fail("ParseMirrorJob rejects its own canonical JSON: " + again.status().message());
      if (!(again.value() == job)) Fail("ParseMirrorJob(MirrorJobToJson(job)) differs from job");
    }
  } else {
    config::ImageConfig im;
    im.name = "disk.raw";
    im.path = "/tmp/disk.qcow2";
    cfg.images.push_back(im);
  }
  // The same text as a -o list (on the parsed config, or a one-image default).
  (void)config::ApplyOptionList(text, &cfg);
}

void Control(const std::string& line) {
  auto r = config::ParseControlRequest(line);
  if (r.ok()) {
    // What parses formats again, and that parses to the same request.
    std::string again = config::FormatRequest(r->cmd, r->args_json);
    auto r2 = config::ParseControlRequest(again);
    if (!r2.ok()) Fail("a formatted request does not parse: " + r2.status().message());
    if (r2->cmd != r->cmd || r2->args_json != r->args_json) Fail("a request does not round-trip");
    // Any request's args as a mirror job (mirror-start's): accepted jobs round-trip.
    auto job = config::ParseMirrorJob(r->args_json);
    if (job.ok()) {
      auto j2 = config::ParseMirrorJob(config::MirrorJobToJson(job.value()));
      if (!j2.ok() || !(j2.value() == job.value())) Fail("a mirror-start job does not round-trip");
    }
  }
  auto reply = config::ParseReply(line);
  if (reply.ok()) {
    // An ok reply's result is JSON text: it formats into a reply that parses back.
    auto r2 = config::ParseReply(config::FormatOkReply(reply.value()));
    if (!r2.ok() || r2.value() != reply.value()) Fail("an ok reply does not round-trip");
  }
  auto status = config::StatusFromJson(line);
  if (status.ok()) {
    (void)config::StatusToText(status.value());
    std::string json = config::StatusToJson(status.value());
    auto s2 = config::StatusFromJson(json);
    if (!s2.ok()) Fail("StatusToJson output does not parse: " + s2.status().message());
    if (config::StatusToJson(s2.value()) != json) Fail("a status report does not round-trip");
  }
}

// Error messages and paths are arbitrary bytes (a Linux path need not be UTF-8): putting
// them into a control-socket reply must not throw (the daemon's control thread would
// terminate the mount).
void Format(const std::string& text) {
  auto r = config::ParseReply(config::FormatErrorReply(text));
  if (r.ok()) Fail("an error reply parses as ok");
  config::StatusReport rep;
  rep.mountpoint = text;
  config::ImageReport im;
  im.name = im.path = text;
  rep.images.push_back(im);
  if (!config::StatusFromJson(config::StatusToJson(rep)).ok()) Fail("a status report with this path does not parse");
}

}  // namespace

void RunConfigInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  Size(text);
  MountConfig(text);
  Control(text);
  Format(text);
  (void)config::SystemdEscapePath("/" + text);
}

}  // namespace qcowfs::fuzz
