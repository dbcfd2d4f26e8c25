// fio as the guest's writer in the mount tests: one fio process in the background on a file
// (the mounted image) for a fixed time, writing random blocks with --verify=crc32c and
// --verify_backlog, so every block it writes is read back and checked shortly after, all
// along the run, and optionally punching holes (fallocate) in a second range meanwhile.
// Stopped by PID with the test; Finish() fails the test if fio exits nonzero, reports an
// error (a failed I/O or a verify mismatch) or verified nothing.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "support/nbd_servers.h"
#include "support/temp_dir.h"

namespace qcowfs::testing {

struct FioSpec {
  std::string file;
  uint64_t offset = 0, size = 0;              // verified random writes of 4K..64K here
  uint64_t punch_offset = 0, punch_size = 0;  // size > 0: 64K holes punched at random here
  int runtime_ms = 2000;
};

class FioRun {
 public:
  FioRun(const TempDir& dir, const FioSpec& spec) : spec_(spec) {
    RequireTool("fio");
    static int n = 0;
    std::string name = "fio" + std::to_string(n++);
    out_ = dir.File(name + ".json");
    std::vector<std::string> argv = {
        "fio", "--output-format=json", "--output=" + out_,
        // global: every job works on the existing file, O_DIRECT, for runtime_ms
        "--filename=" + spec.file, "--direct=1", "--invalidate=0", "--fallocate=none", "--allow_file_create=0",
        "--time_based", "--runtime=" + std::to_string(spec.runtime_ms) + "ms", "--verify_state_save=0",
        // the verified writer
        "--name=verify", "--ioengine=psync", "--rw=randwrite", "--bsrange=4k-64k",
        "--offset=" + std::to_string(spec.offset), "--size=" + std::to_string(spec.size), "--verify=crc32c",
        "--do_verify=1", "--verify_backlog=16", "--verify_fatal=1"};
    if (spec.punch_size > 0) {
      argv.insert(argv.end(), {"--name=punch", "--ioengine=falloc", "--rw=randtrim", "--bs=64k",
                               "--offset=" + std::to_string(spec.punch_offset),
                               "--size=" + std::to_string(spec.punch_size), "--thinktime=2ms"});
    }
    proc_ = std::make_unique<Server>(argv, dir.File(name + ".log"), [] { return true; });
  }

  // Waits for fio to end by itself (the run time plus its final verify, under a generous
  // bound), then checks it: exit 0, no job error, data written and read back verified.
  void Finish(int timeout_ms = 120000) {
    REQUIRE(proc_);
    int rc = proc_->WaitExit(timeout_ms);
    std::string log = proc_->Log(), out = ReadWholeFile(out_);
    INFO("fio exit " << rc << "\nfio stderr: " << log << "\nfio json: " << out.substr(0, 4000));
    REQUIRE_MESSAGE(rc != -1, "fio still running after " << timeout_ms << " ms");
    CHECK(rc == 0);
    nlohmann::json j = nlohmann::json::parse(out.substr(std::min(out.find('{'), out.size())), nullptr, false);
    REQUIRE_FALSE(j.is_discarded());
    for (const auto& job : j.at("jobs")) {
      INFO("fio job " << job.at("jobname").get<std::string>());
      CHECK(job.at("error").get<int>() == 0);
      if (job.at("jobname") == "verify") {
        written = job.at("write").at("io_bytes").get<uint64_t>();
        verified = job.at("read").at("io_bytes").get<uint64_t>();
      }
    }
    CHECK(written > 0);
    CHECK(verified > 0);
    proc_.reset();
  }

  uint64_t written = 0, verified = 0;

 private:
  FioSpec spec_;
  std::string out_;
  std::unique_ptr<Server> proc_;
};

}  // namespace qcowfs::testing
