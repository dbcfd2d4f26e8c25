#include "support/ack_model.h"

#include <algorithm>
#include <cstring>
#include <utility>

namespace qcowfs::testing {

AckModel::AckModel(std::vector<uint8_t> initial)
    : initial_(std::move(initial)),
      current_(initial_),
      current_size_(initial_.size()),
      acked_(initial_),
      acked_size_(initial_.size()),
      initial_size_(initial_.size()) {}

const std::vector<uint8_t>& AckModel::Write(uint64_t off, uint64_t len, size_t pos) {
  ops_.push_back(Op{Op::kWrite, off, len, pos});
  buf_.resize(len);
  for (uint64_t i = 0; i < len; i++) buf_[i] = Val(ops_.size() - 1, off + i);
  Apply(ops_.size() - 1, &current_, &current_size_);
  return buf_;
}

void AckModel::Zero(uint64_t off, uint64_t len, size_t pos) {
  ops_.push_back(Op{Op::kZero, off, len, pos});
  Apply(ops_.size() - 1, &current_, &current_size_);
}

void AckModel::Resize(uint64_t new_size, size_t pos) {
  ops_.push_back(Op{Op::kResize, 0, new_size, pos});
  Apply(ops_.size() - 1, &current_, &current_size_);
  // Every view spans the largest size (zeros past its own size).
  if (acked_.size() < new_size) acked_.resize(new_size, 0);
  if (initial_.size() < new_size) initial_.resize(new_size, 0);
}

void AckModel::FlushReturned(size_t pos) { flushes_.emplace_back(pos, ops_.size()); }

void AckModel::Apply(size_t i, std::vector<uint8_t>* bytes, uint64_t* size) const {
  const Op& op = ops_[i];
  switch (op.kind) {
    case Op::kWrite:
      for (uint64_t b = 0; b < op.len; b++) (*bytes)[op.off + b] = Val(i, op.off + b);
      break;
    case Op::kZero:
      std::memset(bytes->data() + op.off, 0, op.len);
      break;
    case Op::kResize:
      if (bytes->size() < op.len) bytes->resize(op.len, 0);
      *size = std::max(*size, op.len);
      break;
  }
}

void AckModel::CrashAt(size_t pos) {
  size_t n = 0;
  for (auto [returned, acked] : flushes_)
    if (returned <= pos) n = std::max(n, acked);
  if (n < applied_) {  // moving back: start over
    acked_ = initial_;
    acked_size_ = initial_size_;
    applied_ = 0;
  }
  for (; applied_ < n; applied_++) Apply(applied_, &acked_, &acked_size_);
  candidates_.clear();
  for (size_t i = n; i < ops_.size(); i++)
    if (ops_[i].start <= pos) candidates_.push_back(i);
}

uint64_t AckModel::max_size() const {
  uint64_t s = acked_size_;
  for (size_t i : candidates_)
    if (ops_[i].kind == Op::kResize) s = std::max(s, ops_[i].len);
  return s;
}

bool AckModel::Allowed(uint64_t i, uint8_t v) const {
  if (v == acked_[i]) return true;
  for (size_t c : candidates_) {
    const Op& op = ops_[c];
    if (op.kind == Op::kResize || i < op.off || i >= op.off + op.len) continue;
    if (v == (op.kind == Op::kWrite ? Val(c, i) : 0)) return true;
  }
  return false;
}

std::string AckModel::TouchedBy(uint64_t i) const {
  std::string out;
  for (size_t c : candidates_) {
    const Op& op = ops_[c];
    if (op.kind == Op::kResize || i < op.off || i >= op.off + op.len) continue;
    out += " op" + std::to_string(c) + (op.kind == Op::kWrite ? "(write " : "(zero ") +
           std::to_string(op.off) + "+" + std::to_string(op.len) + ")";
  }
  return out.empty() ? " none" : out;
}

std::string AckModel::Check(const uint8_t* got, uint64_t size) const {
  if (size < acked_size_ || size > max_size())
    return "guest size " + std::to_string(size) + ", expected " + std::to_string(acked_size_) +
           ".." + std::to_string(max_size());
  constexpr uint64_t kChunk = 4096;
  for (uint64_t i = 0; i < size; i++) {
    if (i % kChunk == 0 && size - i >= kChunk && std::memcmp(got + i, &acked_[i], kChunk) == 0) {
      i += kChunk - 1;  // the common case: a whole chunk as acknowledged
      continue;
    }
    if (got[i] == acked_[i] || Allowed(i, got[i])) continue;
    // The op that wrote the acknowledged value, for the message.
    std::string by = "the initial image";
    for (size_t c = 0; c < applied_; c++) {
      const Op& op = ops_[c];
      if (op.kind != Op::kResize && i >= op.off && i < op.off + op.len)
        by = "op" + std::to_string(c) + (op.kind == Op::kWrite ? " (write " : " (zero ") +
             std::to_string(op.off) + "+" + std::to_string(op.len) + ")";
    }
    return "guest byte " + std::to_string(i) + " reads " + std::to_string(got[i]) +
           ", acknowledged value " + std::to_string(acked_[i]) + " from " + by +
           "; unacknowledged ops over it:" + TouchedBy(i);
  }
  return "";
}

}  // namespace qcowfs::testing
