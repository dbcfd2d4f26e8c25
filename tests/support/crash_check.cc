#include "support/crash_check.h"

#include <fstream>
#include <sstream>

#include "qcow2/format.h"
#include "support/process.h"
#include "util/endian.h"

namespace qcowfs::testing {

ImageCheck QemuImgCheck(const std::string& img) {
  CmdResult r = RunCommand({"qemu-img", "check", "-f", "qcow2", img});
  return ImageCheck{r.exit_code, r.out + r.err};
}

bool CrashCheckPasses(const ImageCheck& r, bool allow_leaks, bool dirty) {
  if (r.exit_code == 0 || (r.exit_code == 3 && allow_leaks)) return true;
  return dirty && (r.exit_code == 2 || r.exit_code == 3) && OnlyRefcountErrors(r.output);
}

std::string DescribeCheck(const ImageCheck& r, const std::string& when) {
  return "qemu-img check " + when + " exit " + std::to_string(r.exit_code) + ":\n" +
         HeadLines(r.output, 30);
}

bool OnlyRefcountErrors(const std::string& output) {
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("ERROR", 0) != 0) continue;
    bool refcount =
        (line.rfind("ERROR cluster ", 0) == 0 || line.rfind("ERROR OFLAG_COPIED ", 0) == 0) &&
        line.find(" refcount=") != std::string::npos;
    if (!refcount) return false;
  }
  return true;
}

std::string HeadLines(const std::string& s, int lines) {
  size_t pos = 0;
  for (int i = 0; i < lines && pos != std::string::npos; i++) pos = s.find('\n', pos + 1);
  if (pos == std::string::npos) return s;
  int rest = 0;
  for (size_t i = pos + 1; i < s.size(); i++) rest += s[i] == '\n';
  return s.substr(0, pos + 1) + "[... " + std::to_string(rest) + " more lines]\n";
}

bool DirtyBit(const uint8_t* header, size_t len) {
  return len >= 80 && LoadBE32(header + 4) >= 3 &&
         (LoadBE64(header + 72) & qcow2::kIncompatDirty) != 0;
}

bool DirtyBitOf(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  uint8_t h[80] = {};
  f.read(reinterpret_cast<char*>(h), sizeof(h));
  return f.gcount() == sizeof(h) && DirtyBit(h, sizeof(h));
}

}  // namespace qcowfs::testing
