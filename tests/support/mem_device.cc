#include "support/mem_device.h"

#include <algorithm>
#include <cstring>

namespace qcowfs::testing {

Status MemDevice::Read(uint64_t offset, void* buf, size_t len) {
  MutexLock l(&mu_);
  ReadLocked(offset, buf, len);
  return Status::Ok();
}

void MemDevice::ReadLocked(uint64_t offset, void* buf, size_t len) const {
  auto* out = static_cast<uint8_t*>(buf);
  while (len > 0) {
    uint64_t idx = offset / kChunkSize;
    uint64_t in = offset % kChunkSize;
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, kChunkSize - in));
    auto it = chunks_.find(idx);
    if (it == chunks_.end()) {
      std::memset(out, 0, n);
    } else {
      std::memcpy(out, it->second->data() + in, n);
    }
    out += n;
    offset += n;
    len -= n;
  }
}

Status MemDevice::Write(uint64_t offset, const void* buf, size_t len) {
  MutexLock l(&mu_);
  const auto* in_buf = static_cast<const uint8_t*>(buf);
  size_ = std::max<uint64_t>(size_, offset + len);
  while (len > 0) {
    uint64_t idx = offset / kChunkSize;
    uint64_t in = offset % kChunkSize;
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, kChunkSize - in));
    auto& chunk = chunks_[idx];
    if (!chunk) {
      chunk = std::make_unique<Chunk>();
      chunk->fill(0);
    }
    std::memcpy(chunk->data() + in, in_buf, n);
    in_buf += n;
    offset += n;
    len -= n;
  }
  return Status::Ok();
}

void MemDevice::ZeroRangeLocked(uint64_t offset, uint64_t len) {
  uint64_t end = offset + len;
  while (offset < end) {
    uint64_t idx = offset / kChunkSize;
    uint64_t in = offset % kChunkSize;
    uint64_t n = std::min<uint64_t>(end - offset, kChunkSize - in);
    auto it = chunks_.find(idx);
    if (it != chunks_.end()) {
      if (n == kChunkSize) {
        chunks_.erase(it);
      } else {
        std::memset(it->second->data() + in, 0, n);
        const Chunk& c = *it->second;
        if (std::all_of(c.begin(), c.end(), [](uint8_t b) { return b == 0; })) chunks_.erase(it);
      }
    }
    offset += n;
  }
}

Status MemDevice::WriteZeroes(uint64_t offset, uint64_t len, bool /*may_unmap*/) {
  MutexLock l(&mu_);
  if (len == 0) return Status::Ok();
  ZeroRangeLocked(offset, len);
  size_ = std::max<uint64_t>(size_, offset + len);
  return Status::Ok();
}

Status MemDevice::Discard(uint64_t offset, uint64_t len) {
  MutexLock l(&mu_);
  // Like a punch hole: never extends the device.
  if (offset >= size_ || len == 0) return Status::Ok();
  ZeroRangeLocked(offset, std::min<uint64_t>(len, size_ - offset));
  return Status::Ok();
}

Result<block::BlockStatus> MemDevice::GetBlockStatus(uint64_t offset, uint64_t len) {
  MutexLock l(&mu_);
  if (len == 0) return Status::Invalid("GetBlockStatus: zero length");
  uint64_t end = offset + len;
  if (offset >= size_) return block::BlockStatus{block::ExtentType::kZero, len};
  end = std::min(end, size_);
  bool data = chunks_.count(offset / kChunkSize) != 0;
  uint64_t pos = offset;
  while (pos < end) {
    uint64_t idx = pos / kChunkSize;
    if ((chunks_.count(idx) != 0) != data) break;
    pos = (idx + 1) * kChunkSize;
  }
  pos = std::min(pos, end);
  return block::BlockStatus{data ? block::ExtentType::kData : block::ExtentType::kZero,
                            pos - offset};
}

uint64_t MemDevice::Size() const {
  MutexLock l(&mu_);
  return size_;
}

void MemDevice::TruncateLocked(uint64_t new_size) {
  if (new_size < size_) {
    // Zero the tail so a later grow reads zeros there.
    ZeroRangeLocked(new_size, size_ - new_size);
  }
  size_ = new_size;
}

Status MemDevice::Resize(uint64_t new_size) {
  MutexLock l(&mu_);
  TruncateLocked(new_size);
  return Status::Ok();
}

uint64_t MemDevice::AllocatedBytes() const {
  MutexLock l(&mu_);
  return chunks_.size() * kChunkSize;
}

std::vector<uint8_t> MemDevice::Contents() const {
  MutexLock l(&mu_);
  std::vector<uint8_t> out(size_);
  ReadLocked(0, out.data(), out.size());
  return out;
}

void MemDevice::CopyFrom(const MemDevice& other) {
  if (&other == this) return;
  // Copy out under other's lock, then install under ours (never both at once).
  std::map<uint64_t, std::unique_ptr<Chunk>> copy;
  uint64_t size;
  {
    MutexLock l(&other.mu_);
    size = other.size_;
    for (const auto& [idx, c] : other.chunks_) copy.emplace(idx, std::make_unique<Chunk>(*c));
  }
  MutexLock l(&mu_);
  size_ = size;
  chunks_ = std::move(copy);
}

}  // namespace qcowfs::testing
