// The cache mode (--cache none|writeback): the top-level config key is the default of
// every image, a per-image key overrides it, -o cache= overrides both, bad values name
// the key.
#include <doctest/doctest.h>

#include <string>

#include "config/config.h"
#include "config/control_protocol.h"

namespace qcowfs::config {
namespace {

MountConfig Parse(const std::string& text) {
  auto r = ParseMountConfig(text, "m.json");
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  return r.value();
}

TEST_CASE("cache mode: default writeback, top level, per image, -o") {
  auto d = Parse(R"({"images": [{"path": "/a.qcow2"}]})");
  CHECK_FALSE(d.images[0].cache_none);

  // Per image first in the text, top level after it: the image keeps its own.
  auto c = Parse(R"({"images": [{"path": "/a.qcow2", "cache": "writeback"}, {"path": "/b.qcow2"}],
                     "cache": "none"})");
  CHECK_FALSE(c.images[0].cache_none);
  CHECK(c.images[1].cache_none);

  auto p = Parse(R"({"images": [{"path": "/a.qcow2", "cache": "none"}, {"path": "/b.qcow2"}]})");
  CHECK(p.images[0].cache_none);
  CHECK_FALSE(p.images[1].cache_none);

  REQUIRE(ApplyOptionList("rw,cache=none", &p).ok());
  CHECK(p.images[0].cache_none);
  CHECK(p.images[1].cache_none);
  REQUIRE(ApplyOptionList("cache=writeback", &p).ok());
  CHECK_FALSE(p.images[0].cache_none);
  CHECK_FALSE(p.images[1].cache_none);
}

TEST_CASE("cache mode: bad values name the key") {
  auto top = ParseMountConfig(R"({"images": [{"path": "/a"}], "cache": "directsync"})", "m.json");
  REQUIRE_FALSE(top.ok());
  CHECK(top.status().message().find("m.json: cache") != std::string::npos);
  CHECK(top.status().message().find("directsync") != std::string::npos);
  auto img = ParseMountConfig(R"({"images": [{"path": "/a", "cache": 1}]})", "m.json");
  REQUIRE_FALSE(img.ok());
  CHECK(img.status().message().find("images[0].cache") != std::string::npos);
  MountConfig cfg;
  Status s = ApplyOptionList("cache=off", &cfg);
  CHECK_FALSE(s.ok());
  CHECK(s.message().find("-o cache") != std::string::npos);
}

TEST_CASE("cache mode: status JSON and text carry it") {
  StatusReport r;
  r.mountpoint = "/m";
  ImageReport i;
  i.name = "d.raw";
  i.cache_mode = "none";
  r.images.push_back(i);
  auto back = StatusFromJson(StatusToJson(r));
  REQUIRE(back.ok());
  CHECK(back->images[0].cache_mode == "none");
  CHECK(StatusToText(back.value()).find("cache: none (O_DIRECT)") != std::string::npos);
}

}  // namespace
}  // namespace qcowfs::config
