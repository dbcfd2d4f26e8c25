// Running a command that must succeed, with its output in the failure message.
#pragma once

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "support/process.h"

namespace qcowfs::testing {

inline std::string Join(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) {
    if (!s.empty()) s += ' ';
    s += a;
  }
  return s;
}

inline CmdResult Must(const std::vector<std::string>& argv) {
  CmdResult r = RunCommand(argv);
  INFO("command: " << Join(argv) << "\nexit " << r.exit_code << "\nstdout: " << r.out
                   << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  return r;
}

}  // namespace qcowfs::testing
