#include "support/temp_dir.h"

#include <stdlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

namespace qcowfs::testing {

TempDir::TempDir(const std::string& prefix, const std::string& base) {
  const char* env = getenv("TMPDIR");
  std::string dir = !base.empty() ? base : env && *env ? env : "/tmp";
  std::string tmpl = dir + "/" + prefix + ".XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) {
    fprintf(stderr, "TempDir: mkdtemp(%s): %s\n", tmpl.c_str(), strerror(errno));
    abort();
  }
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
  if (ec) fprintf(stderr, "TempDir: cannot remove %s: %s\n", path_.c_str(), ec.message().c_str());
}

}  // namespace qcowfs::testing
