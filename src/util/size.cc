#include "util/size.h"

#include <cctype>
#include <cstdio>

namespace qcowfs {

Result<uint64_t> ParseSize(const std::string& text) {
  size_t i = 0;
  uint64_t v = 0;
  if (text.empty() || !isdigit(static_cast<unsigned char>(text[0])))
    return Status::Invalid("invalid size '" + text + "': expected a number with an optional K, M, G or T suffix");
  while (i < text.size() && isdigit(static_cast<unsigned char>(text[i]))) {
    uint64_t d = static_cast<uint64_t>(text[i] - '0');
    if (v > (UINT64_MAX - d) / 10) return Status::Invalid("invalid size '" + text + "': too large");
    v = v * 10 + d;
    i++;
  }
  std::string suffix = text.substr(i);
  int shift = 0;
  if (suffix.empty() || suffix == "B" || suffix == "b") shift = 0;
  else {
    char c = static_cast<char>(toupper(static_cast<unsigned char>(suffix[0])));
    std::string tail = suffix.substr(1);
    if (!(tail.empty() || tail == "B" || tail == "iB" || tail == "b"))
      return Status::Invalid("invalid size '" + text + "': unknown suffix '" + suffix + "'");
    switch (c) {
      case 'K': shift = 10; break;
      case 'M': shift = 20; break;
      case 'G': shift = 30; break;
      case 'T': shift = 40; break;
      case 'P': shift = 50; break;
      case 'E': shift = 60; break;
      default: return Status::Invalid("invalid size '" + text + "': unknown suffix '" + suffix + "'");
    }
  }
  if (shift && v > (UINT64_MAX >> shift)) return Status::Invalid("invalid size '" + text + "': too large");
  return v << shift;
}

std::string FormatSize(uint64_t bytes) {
  static const char* kUnits[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024 && u < 6) {
    v /= 1024;
    u++;
  }
  char buf[64];
  if (u == 0) snprintf(buf, sizeof(buf), "%llu bytes", static_cast<unsigned long long>(bytes));
  else if (v == static_cast<double>(static_cast<uint64_t>(v))) snprintf(buf, sizeof(buf), "%llu %s", static_cast<unsigned long long>(v), kUnits[u]);
  else snprintf(buf, sizeof(buf), "%.3g %s", v, kUnits[u]);
  return buf;
}

}  // namespace qcowfs
