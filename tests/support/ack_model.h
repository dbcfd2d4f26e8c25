// AckModel: what a guest must read back after a crash, for crash tests that know where in
// the host's history the crash came (crash_enum_test replays a host log; sync_kill_test
// kills the daemon at its N-th sync).
//
// Positions. The test tells the model, for every guest op, the host position when the op
// started (e.g. the number of host ops recorded so far), and for every guest Flush that
// returned, the position when it returned. A crash "at pos" means host events [0, pos)
// happened and no later one. Then
//   - a guest Flush that returned at a position <= pos acknowledged every guest op issued
//     before it: those bytes must read back exactly (acked());
//   - a later guest op that started at a position <= pos may have reached the disk in
//     whole, in part or not at all: each byte it covers reads as the acknowledged value or
//     as one of those ops left it (writes: Val(op, offset); zeroing: 0);
//   - ops that started after pos did not run.
// A Resize is an op like a write: the size it sets is acknowledged by a later Flush.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qcowfs::testing {

class AckModel {
 public:
  // Guest contents before the first op; the guest size is initial.size().
  explicit AckModel(std::vector<uint8_t> initial);

  // The byte guest op `op` writes at guest offset `off` (both show in a misplaced byte).
  static uint8_t Val(uint64_t op, uint64_t off) {
    return static_cast<uint8_t>(op * 37 + (off >> 9) * 11 + (off & 511) * 3 + 1);
  }

  // Records a write of [off, off+len) starting at pos; returns the bytes to write.
  const std::vector<uint8_t>& Write(uint64_t off, uint64_t len, size_t pos);
  // Records a WriteZeroes or Discard (reads zeros afterwards) starting at pos.
  void Zero(uint64_t off, uint64_t len, size_t pos);
  // Records a grow of the guest to new_size starting at pos.
  void Resize(uint64_t new_size, size_t pos);
  // A guest Flush returned at pos: it acknowledged every op recorded before it.
  void FlushReturned(size_t pos);

  size_t ops() const { return ops_.size(); }
  // What a read must return now (every recorded op applied).
  const std::vector<uint8_t>& current() const { return current_; }
  uint64_t current_size() const { return current_size_; }

  // Sets the crash position for acked(), Check() and the sizes.
  void CrashAt(size_t pos);
  const std::vector<uint8_t>& acked() const { return acked_; }  // zeros past acked_size()
  uint64_t acked_size() const { return acked_size_; }
  // Largest size the guest may have after the crash.
  uint64_t max_size() const;
  // Number of ops acknowledged at the crash, and of ops that may have landed in part.
  size_t acked_ops() const { return applied_; }
  size_t unacked_ops() const { return candidates_.size(); }

  // "" if `got` (the guest read back after the crash: `size` bytes) is allowed, else what
  // is wrong (the first bad byte and the ops that touched it).
  std::string Check(const uint8_t* got, uint64_t size) const;

 private:
  struct Op {
    enum Kind { kWrite, kZero, kResize } kind;
    uint64_t off, len;  // kResize: len is the new size
    size_t start;
  };
  void Apply(size_t i, std::vector<uint8_t>* bytes, uint64_t* size) const;
  bool Allowed(uint64_t i, uint8_t v) const;
  std::string TouchedBy(uint64_t i) const;

  std::vector<uint8_t> initial_;
  std::vector<Op> ops_;
  std::vector<std::pair<size_t, size_t>> flushes_;  // (returned at pos, ops acknowledged)
  std::vector<uint8_t> current_;
  uint64_t current_size_;
  std::vector<uint8_t> buf_;

  std::vector<uint8_t> acked_;
  uint64_t acked_size_;
  uint64_t initial_size_;
  size_t applied_ = 0;              // ops applied to acked_
  std::vector<size_t> candidates_;  // unacknowledged ops that may have landed
};

}  // namespace qcowfs::testing
