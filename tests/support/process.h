// Running external tools (qemu-img, qemu-io, the qcowfs binary) from tests.
#pragma once

#include <string>
#include <vector>

namespace qcowfs::testing {

struct CmdResult {
  int exit_code;  // exit status; 128+N if killed by signal N; 127 if exec failed
  std::string out;
  std::string err;
};

// Runs argv[0] (looked up in PATH) with argv, no shell, stdin from /dev/null; captures
// stdout and stderr separately and waits for it to exit. A non-empty cwd is the child's
// working directory (e.g. qemu-img resolves a relative external data file name from it).
CmdResult RunCommand(const std::vector<std::string>& argv, const std::string& cwd = "");

// True if name is an executable in PATH (or an executable path if it contains '/').
bool HaveTool(const char* name);

// Skips the whole test binary (exit 77, ctest SKIP_RETURN_CODE) with a message, unless the
// environment has CI=true, where a missing prerequisite is a failure (abort).
[[noreturn]] void SkipOrFail(const std::string& why);

// SkipOrFail unless the tool is installed.
void RequireTool(const char* name);

// The qcowfs binary under test ($QCOWFS_TEST_BIN, set by ctest); SkipOrFail if unset.
std::string QcowfsBin();

// Hex sha256 of a file (via sha256sum); empty on error.
std::string Sha256File(const std::string& path);

}  // namespace qcowfs::testing
