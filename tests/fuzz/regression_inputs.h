// The saved inputs of one fuzz target (tests/fuzz/regressions/<target>/*), for the
// regression doctests. QCOWFS_FUZZ_REGRESSIONS_DIR comes from tests/CMakeLists.txt.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace qcowfs::fuzz {

// (path, contents) of every regular file under regressions/<target>/, sorted by path.
inline std::vector<std::pair<std::string, std::vector<uint8_t>>> RegressionInputs(
    const std::string& target) {
  namespace fs = std::filesystem;
  std::vector<std::pair<std::string, std::vector<uint8_t>>> out;
  const fs::path dir = fs::path(QCOWFS_FUZZ_REGRESSIONS_DIR) / target;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  std::vector<std::string> paths;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (e.is_regular_file()) paths.push_back(e.path().string());
  std::sort(paths.begin(), paths.end());
  for (const auto& p : paths) {
    std::ifstream f(p, std::ios::binary);
    out.emplace_back(p, std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {}));
  }
  return out;
}

constexpr int kThrew = 86;

// Runs body(bytes) in a child process, so an input that still crashes or aborts fails
// one check instead of killing the whole test binary. Returns "" when the child exited
// normally, else what happened to it (its stderr carries the report).
template <typename Body>
std::string RunInChild(Body body, const std::vector<uint8_t>& bytes) {
  std::fflush(nullptr);
  pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    // Nothing may unwind into the test framework's copy in the child.
    try {
      body(bytes.data(), bytes.size());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "uncaught exception: %s\n", e.what());
      _exit(kThrew);
    } catch (...) {
      _exit(kThrew);
    }
    _exit(0);
  }
  int st = 0;
  while (waitpid(pid, &st, 0) < 0) {
  }
  if (WIFEXITED(st) && WEXITSTATUS(st) == 0) return "";
  if (WIFSIGNALED(st)) return "killed by signal " + std::to_string(WTERMSIG(st));
  if (WEXITSTATUS(st) == kThrew) return "an exception escaped";
  return "exit status " + std::to_string(WEXITSTATUS(st));
}

}  // namespace qcowfs::fuzz
