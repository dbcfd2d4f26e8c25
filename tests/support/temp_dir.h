// TempDir: a fresh directory under $TMPDIR (or /tmp, or a given base directory), removed
// with its contents on destruction.
#pragma once

#include <string>

namespace qcowfs::testing {

class TempDir {
 public:
  // Aborts the test binary if the directory cannot be made. A non-empty base replaces
  // $TMPDIR (e.g. a tmpfs for tests that fdatasync a lot).
  explicit TempDir(const std::string& prefix = "qcowfs-test", const std::string& base = "");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  // path()/name (the file is not created).
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace qcowfs::testing
