// Leveled printf-style logging to stderr (foreground) or syslog (daemon).
#pragma once

namespace qcowfs {

enum class LogLevel { kError = 0, kWarn = 1, kInfo = 2, kDebug = 3 };

void SetLogLevel(LogLevel level);
void SetLogToSyslog(bool on);
bool LogEnabled(LogLevel level);
void LogPrintf(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

}  // namespace qcowfs

#define QCOWFS_LOG(level, ...)                                             \
  do {                                                                     \
    if (::qcowfs::LogEnabled(::qcowfs::LogLevel::k##level))                \
      ::qcowfs::LogPrintf(::qcowfs::LogLevel::k##level, __VA_ARGS__);      \
  } while (0)
