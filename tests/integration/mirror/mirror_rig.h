// The mirror integration tests' rig: a scratch directory with the source image, a file
// mountpoint and a control socket, and the `qcowfs mirror` CLI run against that socket.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "integration/mount/mount_guard.h"

namespace qcowfs::testing::mount {

struct MirrorRig {
  Scratch s;
  std::string img = s.File("src.qcow2"), mp = s.FileMountpoint(), sock = s.File("ctl.sock");
  int n = 0;

  // `qcowfs mirror SUB --socket SOCK ARGS...`
  CmdResult Mirror(const std::vector<std::string>& args, int timeout_ms = 60000) {
    std::vector<std::string> argv = {Bin(), "mirror", args[0], "--socket", sock};
    argv.insert(argv.end(), args.begin() + 1, args.end());
    return RunTimed(argv, WithTimeout(timeout_ms));
  }
  CmdResult MustMirror(const std::vector<std::string>& args) {
    CmdResult r = Mirror(args);
    INFO(Describe(args, r));
    REQUIRE(r.exit_code == 0);
    return r;
  }
  // A job file with this JSON.
  std::string Job(const std::string& json) {
    std::string f = s.File("job" + std::to_string(n++) + ".json");
    WriteFileText(f, json);
    return f;
  }
  // "state" or "state: error" of a job.
  std::string JobState(const std::string& id) {
    auto j = nlohmann::json::parse(MustMirror({"status", id, "--json"}).out);
    std::string e = j["error"].get<std::string>();
    return j["state"].get<std::string>() + (e.empty() ? "" : ": " + e);
  }
};

}  // namespace qcowfs::testing::mount
