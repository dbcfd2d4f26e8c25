#include "util/log.h"

#include <syslog.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>

namespace qcowfs {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kWarn)};
std::atomic<bool> g_syslog{false};
const char* kNames[] = {"error", "warn", "info", "debug"};
}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }
void SetLogToSyslog(bool on) { g_syslog = on; }
bool LogEnabled(LogLevel level) { return static_cast<int>(level) <= g_level.load(); }

void LogPrintf(LogLevel level, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  if (g_syslog) {
    static const int kPrio[] = {LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG};
    syslog(kPrio[static_cast<int>(level)], "%s", buf);
  } else {
    std::fprintf(stderr, "qcowfs: %s: %s\n", kNames[static_cast<int>(level)], buf);
  }
}

}  // namespace qcowfs
