// Replays every saved config-fuzzer input (tests/fuzz/regressions/config/) through the
// fuzz target's body: no crash, no escaping exception, round trips hold.
#include <doctest/doctest.h>

#include "fuzz/config_fuzz_body.h"
#include "fuzz/regression_inputs.h"

namespace qcowfs::fuzz {
namespace {

TEST_CASE("fuzz regressions: saved config inputs run cleanly") {
  auto inputs = RegressionInputs("config");
  for (const auto& input : inputs) {
    const std::string& path = input.first;  // (no structured binding: clang-14 lambdas)
    // In a child: a crash or an escaping exception fails this one check only.
    std::string failure = RunInChild(RunConfigInput, input.second);
    CHECK_MESSAGE(failure.empty(), path << ": " << failure);
  }
  MESSAGE(inputs.size() << " saved config input(s) replayed");
}

}  // namespace
}  // namespace qcowfs::fuzz
