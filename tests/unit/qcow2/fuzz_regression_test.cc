// Replays every saved image-fuzzer input (tests/fuzz/regressions/image/) through the
// fuzz target's body, so each crash the fuzzer found stays fixed in every build.
#include <doctest/doctest.h>

#include "fuzz/image_fuzz_body.h"
#include "fuzz/regression_inputs.h"

namespace qcowfs::fuzz {
namespace {

TEST_CASE("fuzz regressions: saved image inputs run cleanly") {
  auto inputs = RegressionInputs("image");
  for (const auto& input : inputs) {
    const std::string& path = input.first;  // (no structured binding: clang-14 lambdas)
    std::string failure = RunInChild(RunImageInput, input.second);
    CHECK_MESSAGE(failure.empty(), path << ": " << failure);
  }
  MESSAGE(inputs.size() << " saved image input(s) replayed");
}

}  // namespace
}  // namespace qcowfs::fuzz
