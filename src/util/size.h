// Parsing sizes written as plain bytes or with K/M/G/T suffixes (powers of 1024).
#pragma once

#include <cstdint>
#include <string>

#include "util/status.h"

namespace qcowfs {

Result<uint64_t> ParseSize(const std::string& text);
// "1 GiB", "512 KiB", "123 bytes": for messages and info.
std::string FormatSize(uint64_t bytes);

}  // namespace qcowfs
