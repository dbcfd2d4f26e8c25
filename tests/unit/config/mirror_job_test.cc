// The mirror job JSON (SPEC §6) as a typed struct: defaults, every key, errors that name
// the key path, and the canonical JSON reading back to the same job.
#include <doctest/doctest.h>

#include <string>

#include "config/config.h"
#include "config/mirror_job.h"

namespace qcowfs::config {
namespace {

MirrorJobConfig Ok(const std::string& text) {
  auto r = ParseMirrorJob(text);
  REQUIRE_MESSAGE(r.ok(), text << ": " << r.status().message());
  return r.value();
}

std::string Err(const std::string& text, const std::string& file = "", const std::string& where = "") {
  auto r = ParseMirrorJob(text, file, where);
  REQUIRE_MESSAGE(!r.ok(), text << " was accepted");
  return r.status().message();
}

TEST_CASE("mirror job: defaults") {
  MirrorJobConfig j = Ok(R"({"target": {"path": "/srv/copy.qcow2"}})");
  CHECK(j.id.empty());
  CHECK(j.image.empty());
  CHECK(j.target.kind == MirrorTarget::Kind::kFile);
  CHECK(j.target.path == "/srv/copy.qcow2");
  CHECK(j.target.format == MirrorTarget::Format::kQcow2);
  CHECK_FALSE(j.target.existing);
  CHECK(j.mode == MirrorJobConfig::Mode::kBackground);
  CHECK_FALSE(j.copy_on_read);
  CHECK(j.sync == MirrorJobConfig::Sync::kFull);
  CHECK(j.granularity == 0);
  CHECK(j.buf_size == 16ull << 20);
  CHECK(j.speed == 0);
  CHECK(j.target_timeout_s == 10);
}

TEST_CASE("mirror job: every key, and the canonical JSON reads back the same") {
  MirrorJobConfig j = Ok(R"({"id": "mig1", "image": "disk.raw",
      "target": {"path": "/srv/copy.raw", "format": "raw", "existing": true},
      "mode": "write-blocking", "copy_on_read": true, "sync": "full", "granularity": "64K",
      "buf_size": "8M", "speed": 1048576, "target_timeout": 30})");
  CHECK(j.id == "mig1");
  CHECK(j.image == "disk.raw");
  CHECK(j.target.format == MirrorTarget::Format::kRaw);
  CHECK(j.target.existing);
  CHECK(j.mode == MirrorJobConfig::Mode::kWriteBlocking);
  CHECK(j.copy_on_read);
  CHECK(j.granularity == 65536);
  CHECK(j.buf_size == 8ull << 20);
  CHECK(j.speed == 1048576);
  CHECK(j.target_timeout_s == 30);
  CHECK(Ok(MirrorJobToJson(j)) == j);

  MirrorJobConfig n = Ok(R"({"target": {"nbd": "nbd+unix:///disk?socket=/run/nbd.sock"}})");
  CHECK(n.target.kind == MirrorTarget::Kind::kNbd);
  CHECK(n.target.nbd_uri == "nbd+unix:///disk?socket=/run/nbd.sock");
  CHECK(Ok(MirrorJobToJson(n)) == n);
  CHECK(Ok(R"({"target": {"nbd": "nbd://10.0.0.2:10809/disk"}})").target.nbd_uri == "nbd://10.0.0.2:10809/disk");

  MirrorJobConfig t = Ok(R"({"sync": "top", "target": {"path": "/srv/top.qcow2", "backing": "/srv/base.qcow2"}})");
  CHECK(t.sync == MirrorJobConfig::Sync::kTop);
  CHECK(t.target.backing == "/srv/base.qcow2");
  CHECK(Ok(MirrorJobToJson(t)) == t);
}

TEST_CASE("mirror job: errors name the key path") {
  CHECK(Err(R"({})") == "target: is required");
  CHECK(Err(R"({"target": {"path": "/x"}, "granularity": "3K"})") == "granularity: must be a power of two from 4K to 64M");
  CHECK(Err(R"({"target": {"path": "/x"}, "granularity": "2K"})") == "granularity: must be a power of two from 4K to 64M");
  CHECK(Err(R"({"target": {"path": "/x"}, "granularity": "128M"})") == "granularity: must be a power of two from 4K to 64M");
  CHECK(Err(R"({"target": {"path": "/x"}, "bogus": 1})") == "bogus: unknown key");
  CHECK(Err(R"({"target": {"path": "/x", "colour": "red"}})") == "target.colour: unknown key");
  CHECK(Err(R"({"target": {"path": "/x", "nbd": "nbd://h/e"}})") == "target: needs exactly one of \"path\" and \"nbd\"");
  CHECK(Err(R"({"target": {"nbd": "http://h/e"}})").find("target.nbd: must be an nbd://") == 0);
  CHECK(Err(R"({"target": {"nbd": "nbd://h/e", "format": "raw"}})").find("target.format: unknown key for an NBD target") == 0);
  CHECK(Err(R"({"target": {"path": "/x", "format": "vmdk"}})") == "target.format: must be \"qcow2\" or \"raw\" (got \"vmdk\")");
  CHECK(Err(R"({"target": {"path": "/x", "existing": "yes"}})") == "target.existing: must be true or false");
  CHECK(Err(R"({"target": {"path": "/x"}, "mode": "active"})") == "mode: must be \"background\" or \"write-blocking\" (got \"active\")");
  CHECK(Err(R"({"target": {"path": "/x"}, "sync": "none"})") == "sync: must be \"full\" or \"top\" (got \"none\")");
  CHECK(Err(R"({"target": {"path": "/x"}, "target_timeout": 0})") == "target_timeout: must be a number of seconds from 1 to 3600");
  CHECK(Err(R"({"target": {"path": "/x"}, "buf_size": "4K", "granularity": "64K"})") == "buf_size: must be at least the granularity");
  CHECK(Err(R"({"target": {"nbd": "nbd://h/e"}, "sync": "top"})") == "sync: \"top\" needs a new qcow2 file target");
  CHECK(Err(R"({"target": {"path": "/x", "backing": "/b"}})") == "target.backing: is only for sync \"top\"");
  CHECK(Err(R"({"target": {"path": "/x"}, "id": ""})") == "id: must not be empty");
  CHECK(Err(R"([1])") == "job: must be a JSON object");
  CHECK(Err(R"({"target": {"path": "/x"}, "speed": "fast"})", "vm.json", "mirrors[1]").find("vm.json: mirrors[1].speed: ") == 0);
}

TEST_CASE("mirror job: the mount config parses its mirrors and names their key paths") {
  auto r = ParseMountConfig(R"({"mountpoint": "/mnt", "images": [{"path": "/d.qcow2"}],
      "mirrors": [{"target": {"path": "/c.qcow2"}}, {"target": {"nbd": "nbd://h/e"}, "mode": "write-blocking"}]})",
                            "vm.json");
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  REQUIRE(r.value().mirrors.size() == 2);
  CHECK(r.value().mirrors[1].mode == MirrorJobConfig::Mode::kWriteBlocking);
  auto bad = ParseMountConfig(R"({"mountpoint": "/mnt", "images": [{"path": "/d.qcow2"}],
      "mirrors": [{"target": {"path": "/c.qcow2"}}, {"target": {"path": "/c.qcow2"}, "granularity": 1}]})",
                              "vm.json");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message() == "vm.json: mirrors[1].granularity: must be a power of two from 4K to 64M");
}

}  // namespace
}  // namespace qcowfs::config
