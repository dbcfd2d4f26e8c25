#include "mirror/mirror_job.h"

#include <algorithm>
#include <cstring>

#include "qcow2/image.h"
#include "util/log.h"

namespace qcowfs::mirror {
namespace {

constexpr uint64_t kMaxOpBytes = 1ull << 20;  // one copy operation: at most 1 MiB (or a chunk)
// A run of zeros goes out as one write-zeroes of up to this much (it needs no buffer).
constexpr uint64_t kMaxZeroBytes = 1ull << 30;

bool AllZero(const uint8_t* p, uint64_t n) {
  return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}

}  // namespace

const char* StateName(JobState s) {
  switch (s) {
    case JobState::kRunning: return "running";
    case JobState::kReady: return "ready";
    case JobState::kCompleted: return "completed";
    case JobState::kCancelled: return "cancelled";
    case JobState::kFailed: return "failed";
  }
  return "unknown";
}

MirrorJob::MirrorJob(config::MirrorJobConfig cfg, uint64_t granularity, std::string image_name,
                     MirrorFilter* filter, block::BlockDevice* source, Target target)
    : cfg_(std::move(cfg)),
      g_(granularity),
      image_name_(std::move(image_name)),
      filter_(filter),
      source_(source),
      target_(std::move(target)),
      size_(source->Size()),
      chunks_((source->Size() + granularity - 1) / granularity),
      max_op_chunks_(std::max<uint64_t>(1, kMaxOpBytes / granularity)) {
  MutexLock l(&mu_);
  speed_ = cfg_.speed;
  next_copy_ = std::chrono::steady_clock::now();
}

MirrorJob::~MirrorJob() {
  Cancel();
  if (pivoted_) (void)CloseTarget();
}

void MirrorJob::Start() {
  filter_->Pause();
  filter_->SetJob(this);
  filter_->Resume();
  uint64_t op = max_op_chunks_ * g_;
  size_t n = static_cast<size_t>(std::clamp<uint64_t>(cfg_.buf_size / op, 1, 8));
  for (size_t i = 0; i < n; i++) workers_.emplace_back([this] { Worker(); });
  coordinator_ = std::thread([this] { Coordinate(); });
  QCOWFS_LOG(Info, "mirror %s: %s -> %s started (%s, granularity %llu)", cfg_.id.c_str(), image_name_.c_str(),
             target_.desc.c_str(), config::ModeName(cfg_.mode), static_cast<unsigned long long>(g_));
}

uint64_t MirrorJob::ChunkBytes(uint64_t first, uint64_t n) const {
  uint64_t a = first * g_, b = std::min(size_, (first + n) * g_);
  return b > a ? b - a : 0;
}

void MirrorJob::MarkDirtyLocked(uint64_t first, uint64_t n) {
  // bytes_total grows by what became dirty now (chunks already dirty count once).
  uint64_t before = dirty_.count();
  dirty_.Add(first, n);
  bytes_total_ += (dirty_.count() - before) * g_;
}

void MirrorJob::NoteCopiedLocked(uint64_t bytes) {
  copied_data_ += bytes;
  auto now = std::chrono::steady_clock::now();
  double dt = std::chrono::duration<double>(now - rate_mark_).count();
  if (dt >= 1.0) {
    rate_bps_ = static_cast<uint64_t>((copied_data_ - rate_mark_bytes_) / dt);
    rate_mark_ = now;
    rate_mark_bytes_ = copied_data_;
  }
}

void MirrorJob::WakeAll() {
  cv_.SignalAll();
  work_cv_.SignalAll();
}

void MirrorJob::FailLocked(const Status& s) {
  if (state_ == JobState::kRunning || state_ == JobState::kReady) {
    state_ = JobState::kFailed;
    error_ = s.message();
    QCOWFS_LOG(Error, "mirror %s failed: %s", cfg_.id.c_str(), error_.c_str());
  }
  stop_ = true;
  WakeAll();
}

// A target error names the target once.
Status MirrorJob::TargetError(const Status& s) const {
  if (s.message().find(target_.desc) != std::string::npos) return s;
  return Status::Error(s.err(), target_.desc + ": " + s.message());
}

// --- the initial scan

Status MirrorJob::ScanSource() {
  uint64_t pos = 0;
  while (pos < size_) {
    {
      MutexLock l(&mu_);
      if (stop_) return Status::Ok();
    }
    ASSIGN_OR_RETURN(block::BlockStatus bs, PlanExtent(pos, size_ - pos, true));
    uint64_t end = std::min(size_, pos + std::max<uint64_t>(bs.length, 1));
    bool copy = bs.type != block::ExtentType::kUnallocated;
    if (copy) {
      MutexLock l(&mu_);
      uint64_t c0 = pos / g_, c1 = (end + g_ - 1) / g_;
      MarkDirtyLocked(c0, c1 - c0);
      WakeAll();
    }
    pos = end;
  }
  return Status::Ok();
}

// --- copying

Result<block::BlockStatus> MirrorJob::PlanExtent(uint64_t off, uint64_t len, bool first_scan) {
  // Sync "top": a range the source's layer does not allocate is never written on the
  // target either (with a backing file, nothing the guest does deallocates a range).
  if (top_) return top_(off, len);
  ASSIGN_OR_RETURN(block::BlockStatus bs, source_->GetBlockStatus(off, len));
  // Sync "full": the target must read what the guest reads. Zeros and holes become
  // write-zeroes; only the first scan skips them on a target known to read zeros (later,
  // a dirty chunk may hold data the job copied before).
  if (bs.type != block::ExtentType::kData)
    bs.type = first_scan && target_.known_zero ? block::ExtentType::kUnallocated : block::ExtentType::kZero;
  return bs;
}

Status MirrorJob::WriteTarget(uint64_t off, uint64_t len, const uint8_t* data) {
  // Zeros go out as write-zeroes that may unmap, never as data and never as TRIM alone.
  if (!data || AllZero(data, len)) return target_.dev->WriteZeroes(off, len, true);
  RETURN_IF_ERROR(target_.dev->Write(off, data, len));
  // Every kWritebackBytes of data, start the target's writeback (a file target: its dirty
  // pages go to the disk while the copy goes on), so the flush before ready waits for
  // little instead of for the whole copy.
  uint64_t prev = unkicked_bytes_.fetch_add(len, std::memory_order_relaxed);
  if (prev < kWritebackBytes && prev + len >= kWritebackBytes) {
    unkicked_bytes_.fetch_sub(prev + len, std::memory_order_relaxed);
    target_.dev->StartWriteback();
  }
  return Status::Ok();
}

Status MirrorJob::CopyChunks(uint64_t first, uint64_t n, std::vector<uint8_t>* buf) {
  uint64_t pos = first * g_, end = std::min(size_, (first + n) * g_);
  // Adjacent zero extents (the source reports at most one L2 table's span at a time) go
  // out as one write-zeroes.
  uint64_t zero_from = pos, zero_to = pos;
  auto flush_zeros = [&]() -> Status {
    if (zero_to > zero_from) {
      Status s = WriteTarget(zero_from, zero_to - zero_from, nullptr);
      if (!s.ok()) return TargetError(s);
    }
    zero_from = zero_to = pos;
    return Status::Ok();
  };
  while (pos < end) {
    ASSIGN_OR_RETURN(block::BlockStatus bs, PlanExtent(pos, end - pos, false));
    uint64_t ext_end = std::min(end, pos + std::max<uint64_t>(bs.length, 1));
    if (bs.type == block::ExtentType::kZero) {
      if (zero_to != pos) RETURN_IF_ERROR(flush_zeros());
      zero_to = ext_end;
    } else {
      RETURN_IF_ERROR(flush_zeros());
      if (bs.type == block::ExtentType::kData) {
        for (uint64_t p = pos; p < ext_end;) {
          uint64_t len = std::min<uint64_t>(ext_end - p, kMaxOpBytes);
          buf->resize(std::max<uint64_t>(buf->size(), len));
          RETURN_IF_ERROR(source_->Read(p, buf->data(), len));
          Status s = WriteTarget(p, len, buf->data());
          if (!s.ok()) return TargetError(s);
          p += len;
        }
      }  // kUnallocated: nothing to write
    }
    pos = ext_end;
  }
  return flush_zeros();
}

uint64_t MirrorJob::ClaimZeroRun(uint64_t first, uint64_t n) {
  // Unlocked: how far the zero (or skipped) extent at the claimed run's start reaches.
  const uint64_t from = first * g_, limit = std::min(size_, from + kMaxZeroBytes);
  uint64_t reach = from;
  block::ExtentType type = block::ExtentType::kData;
  while (reach < limit) {
    auto bs = PlanExtent(reach, limit - reach, false);
    if (!bs.ok() || bs->type == block::ExtentType::kData || (reach > from && bs->type != type)) break;
    type = bs->type;
    reach = std::min(limit, reach + std::max<uint64_t>(bs->length, 1));
  }
  const uint64_t last = reach == size_ ? chunks_ : reach / g_;  // whole chunks only
  if (last <= first + n) return 0;
  // Claim the dirty, unclaimed chunks that follow, as one claim with the run; CopyChunks
  // then looks at the source again (a guest write may have come in since) and writes
  // what it finds, so the extent seen here is only a hint.
  MutexLock l(&mu_);
  if (stop_) return 0;
  auto [dc, dn] = dirty_.NextRun(first + n, last - (first + n));
  if (dn == 0 || dc != first + n) return 0;
  auto [cc, cn] = claimed_.NextRun(dc, dn);
  if (cn > 0 && cc < dc + dn) dn = cc - dc;
  if (dn == 0) return 0;
  claimed_.Add(dc, dn);
  dirty_.Remove(dc, dn);  // before the source is looked at again, as for any claim
  return dn;
}

std::pair<uint64_t, uint64_t> MirrorJob::PickLocked(uint64_t max) {
  size_t tries = dirty_.runs() + claimed_.runs() + 2;
  uint64_t from = cursor_;
  bool wrapped = false;
  while (tries-- > 0) {
    auto [c, n] = dirty_.NextRun(from, max);
    if (n == 0) {
      if (wrapped || from == 0) return {0, 0};
      wrapped = true;
      from = 0;
      continue;
    }
    // Skip claimed chunks at the front, stop before the next claimed one.
    while (n > 0 && claimed_.Contains(c)) {
      c++;
      n--;
    }
    if (n > 0) {
      auto [cs, cn] = claimed_.NextRun(c, n);
      if (cn > 0 && cs < c + n) n = cs - c;
    }
    if (n > 0) {
      cursor_ = c + n;
      return {c, n};
    }
    from = c + 1;
  }
  return {0, 0};
}

void MirrorJob::Worker() {
  std::vector<uint8_t> buf;
  mu_.Lock();
  while (!stop_) {
    if (speed_ > 0) {
      auto now = std::chrono::steady_clock::now();
      if (now < next_copy_) {
        work_cv_.WaitFor(&mu_, std::chrono::duration_cast<std::chrono::milliseconds>(next_copy_ - now).count() + 1);
        continue;
      }
    }
    uint64_t room = cfg_.buf_size > inflight_bytes_ ? cfg_.buf_size - inflight_bytes_ : 0;
    uint64_t max = std::min<uint64_t>(max_op_chunks_, std::max<uint64_t>(1, room / g_));
    auto [c, n] = room >= g_ || inflight_bytes_ == 0 ? PickLocked(max) : std::pair<uint64_t, uint64_t>{0, 0};
    if (n == 0) {
      work_cv_.Wait(&mu_);
      continue;
    }
    uint64_t bytes = ChunkBytes(c, n);
    claimed_.Add(c, n);
    const bool late = unsafe_clear_after_read_;
    if (!late) dirty_.Remove(c, n);  // before the source read: a guest write after it re-dirties
    inflight_bytes_ += n * g_;
    if (speed_ > 0) {
      next_copy_ = std::max(next_copy_, std::chrono::steady_clock::now()) +
                   std::chrono::microseconds(bytes * 1000000 / speed_);
    }
    mu_.Unlock();
    // A long run of zeros needs no buffer: one claim and one write-zeroes for all of it.
    const uint64_t extra = late ? 0 : ClaimZeroRun(c, n);
    Status s = CopyChunks(c, n + extra, &buf);
    mu_.Lock();
    if (late) dirty_.Remove(c, n);
    claimed_.Remove(c, n + extra);
    inflight_bytes_ -= n * g_;
    if (s.ok()) {
      bytes_done_ += (n + extra) * g_;
      NoteCopiedLocked(bytes + ChunkBytes(c + n, extra));
    } else {
      dirty_.Add(c, n + extra);
      FailLocked(s);
    }
    WakeAll();
  }
  mu_.Unlock();
}

// --- guest hooks

bool MirrorJob::BeforeGuestWrite(uint64_t off, uint64_t len) {
  if (len == 0) return false;
  const uint64_t c0 = off / g_, c1 = (off + len + g_ - 1) / g_;
  MutexLock l(&mu_);
  if (stop_ || !(cfg_.mode == config::MirrorJobConfig::Mode::kWriteBlocking || completing_)) return false;
  // Write-blocking: claim the whole range before the source write, so that of two
  // overlapping guest writes the one that reached the source last reaches the target last.
  claim_waiters_++;
  while (claimed_.Intersects(c0, c1 - c0) && !stop_) cv_.Wait(&mu_);
  claim_waiters_--;
  if (stop_) return false;
  claimed_.Add(c0, c1 - c0);
  return true;
}

void MirrorJob::AfterGuestWrite(uint64_t off, uint64_t len, const void* data, bool may_unmap, bool claimed,
                                bool source_ok) {
  (void)may_unmap;
  if (len == 0) return;
  const uint64_t c0 = off / g_, c1 = (off + len + g_ - 1) / g_;
  mu_.Lock();
  if (stop_ || !claimed || !source_ok) {
    // Background (or a write that began before `complete` switched semantics, or a failed
    // source write that may have changed part of the range): the copy takes it.
    if (claimed) claimed_.Remove(c0, c1 - c0);
    if (!stop_) MarkDirtyLocked(c0, c1 - c0);
    // The hot path of a background job: wake one copy worker, not every thread that waits
    // on the job (claim waiters only if a claim was released).
    if (claimed && claim_waiters_ > 0) cv_.SignalAll();
    work_cv_.Signal();
    mu_.Unlock();
    return;
  }
  // Write-blocking, the range claimed: write through the bytes that lie in chunks no longer
  // dirty (bytes in dirty chunks are left to the copy).
  std::vector<std::pair<uint64_t, uint64_t>> through;  // byte ranges
  for (uint64_t c = c0; c < c1; c++) {
    if (dirty_.Contains(c)) continue;
    uint64_t a = std::max(off, c * g_), b = std::min(off + len, (c + 1) * g_);
    if (!through.empty() && through.back().second == a)
      through.back().second = b;
    else
      through.emplace_back(a, b);
  }
  mu_.Unlock();
  Status s;
  const auto* p = static_cast<const uint8_t*>(data);
  for (auto [a, b] : through) {
    s = data ? target_.dev->Write(a, p + (a - off), b - a) : target_.dev->WriteZeroes(a, b - a, true);
    if (!s.ok()) break;
  }
  mu_.Lock();
  claimed_.Remove(c0, c1 - c0);
  if (!s.ok()) {
    MarkDirtyLocked(c0, c1 - c0);
    FailLocked(TargetError(s));  // wakes everyone
  }
  // Released a claim: guest writes waiting for it, and a copy worker if the range holds
  // dirty chunks it skipped while claimed.
  if (claim_waiters_ > 0) cv_.SignalAll();
  if (dirty_.Intersects(c0, c1 - c0)) work_cv_.Signal();
  mu_.Unlock();
}

Status MirrorJob::GuestRead(block::BlockDevice* src, uint64_t off, void* buf, size_t len) {
  if (!cfg_.copy_on_read || len == 0) return src->Read(off, buf, len);
  // Whole chunks of the read (the last chunk of the image may be short).
  uint64_t cf = (off + g_ - 1) / g_;
  uint64_t end = off + len;
  uint64_t cl = end == size_ ? chunks_ : end / g_;
  std::vector<std::pair<uint64_t, uint64_t>> mine;
  if (cf < cl) {
    MutexLock l(&mu_);
    if (!stop_) {
      for (uint64_t c = cf; c < cl;) {
        auto [rc, rn] = dirty_.NextRun(c, cl - c);
        if (rn == 0 || rc >= cl) break;
        // Opportunistic: skip claimed chunks, respect buf_size.
        uint64_t x = rc;
        while (x < rc + rn) {
          if (claimed_.Contains(x) || inflight_bytes_ + g_ > cfg_.buf_size) {
            x++;
            continue;
          }
          uint64_t y = x;
          while (y < rc + rn && !claimed_.Contains(y) && inflight_bytes_ + (y - x + 1) * g_ <= cfg_.buf_size) y++;
          claimed_.Add(x, y - x);
          if (!unsafe_clear_after_read_) dirty_.Remove(x, y - x);  // before the source read
          inflight_bytes_ += (y - x) * g_;
          mine.emplace_back(x, y - x);
          x = y;
        }
        c = rc + rn;
      }
    }
  }
  Status rs = src->Read(off, buf, len);
  if (mine.empty()) return rs;
  Status ts;
  if (rs.ok()) {
    const auto* p = static_cast<const uint8_t*>(buf);
    for (auto [c, n] : mine) {
      uint64_t a = c * g_, b = std::min(size_, (c + n) * g_);
      ts = WriteTarget(a, b - a, p + (a - off));
      if (!ts.ok()) break;
    }
  }
  MutexLock l(&mu_);
  for (auto [c, n] : mine) {
    if (unsafe_clear_after_read_) dirty_.Remove(c, n);
    claimed_.Remove(c, n);
    inflight_bytes_ -= n * g_;
    if (!rs.ok() || !ts.ok()) {
      dirty_.Add(c, n);
    } else {
      bytes_done_ += n * g_;
      NoteCopiedLocked(ChunkBytes(c, n));
    }
  }
  if (!ts.ok()) FailLocked(TargetError(ts));
  WakeAll();
  return rs;  // the guest gets the source's result, whatever the target did
}

// --- the coordinator: scan, ready, complete, cancel, failure

void MirrorJob::Detach() {
  filter_->Pause();
  filter_->SetJob(nullptr);
  filter_->Resume();
}

void MirrorJob::Coordinate() {
  Status scan = ScanSource();
  mu_.Lock();
  if (!scan.ok()) FailLocked(Status::Error(scan.err(), "reading the source: " + scan.message()));
  scan_done_ = true;
  WakeAll();
  bool done = false;
  while (!done) {
    if (stop_) break;
    if (state_ == JobState::kRunning && CaughtUpLocked()) {
      // Ready: nothing dirty, nothing in flight, target flushed.
      mu_.Unlock();
      Status f = target_.dev->Flush();
      mu_.Lock();
      if (!f.ok()) {
        FailLocked(TargetError(f));
        break;
      }
      if (state_ == JobState::kRunning && CaughtUpLocked()) {
        state_ = JobState::kReady;
        QCOWFS_LOG(Info, "mirror %s: ready", cfg_.id.c_str());
        WakeAll();
      }
      continue;
    }
    if (complete_ && state_ == JobState::kReady) {
      completing_ = true;  // guest writes go through to the target from now on
      while (!CaughtUpLocked() && !stop_) cv_.Wait(&mu_);
      if (stop_) break;
      mu_.Unlock();
      filter_->Pause();  // no guest request in flight, none starts
      mu_.Lock();
      if (!QuiescentLocked()) {
        mu_.Unlock();
        filter_->Resume();
        mu_.Lock();
        continue;
      }
      stop_ = true;
      WakeAll();
      mu_.Unlock();
      for (auto& w : workers_) w.join();
      workers_.clear();
      Status f = target_.dev->Flush();
      mu_.Lock();
      if (!f.ok()) {
        FailLocked(TargetError(f));
        filter_->SetJob(nullptr);
        mu_.Unlock();
        filter_->Resume();
        mu_.Lock();
        break;
      }
      filter_->SetJob(nullptr);
      if (pivot_) {
        filter_->SetLower(target_.dev.get());
        pivoted_ = true;
      }
      state_ = JobState::kCompleted;
      QCOWFS_LOG(Info, "mirror %s: completed%s", cfg_.id.c_str(), pivot_ ? ", the mount now serves the target" : "");
      mu_.Unlock();
      filter_->Resume();
      mu_.Lock();
      done = true;
      break;
    }
    cv_.Wait(&mu_);
  }
  stop_ = true;
  WakeAll();
  mu_.Unlock();
  for (auto& w : workers_) w.join();
  workers_.clear();
  if (!pivoted_) {
    if (filter_->has_job()) Detach();
    (void)CloseTarget();
  }
  MutexLock l(&mu_);
  finished_ = true;
  WakeAll();
}

Status MirrorJob::CloseTarget() {
  if (target_closed_) return Status::Ok();
  target_closed_ = true;
  if (auto* q = dynamic_cast<qcow2::Qcow2Image*>(target_.dev.get())) return q->Close();
  return target_.dev->Flush();
}

// --- control

Status MirrorJob::Complete(bool pivot) {
  {
    MutexLock l(&mu_);
    if (state_ != JobState::kReady)
      return Status::Invalid("job " + cfg_.id + " is " + StateName(state_) + ", not ready: it cannot complete yet");
    complete_ = true;
    pivot_ = pivot;
    WakeAll();
    while (!finished_) cv_.Wait(&mu_);
    if (state_ != JobState::kCompleted) return Status::IoError("job " + cfg_.id + " failed: " + error_);
  }
  if (coordinator_.joinable()) coordinator_.join();
  return Status::Ok();
}

void MirrorJob::Cancel() {
  {
    MutexLock l(&mu_);
    if (!finished_ && (state_ == JobState::kRunning || state_ == JobState::kReady)) {
      state_ = JobState::kCancelled;
      QCOWFS_LOG(Info, "mirror %s: cancelled", cfg_.id.c_str());
    }
    cancel_ = true;
    stop_ = true;
    WakeAll();
  }
  // A cancelled job's target content is undefined anyway: cut a hung connection so the
  // workers come back now (a file target has nothing to abort; its writes end).
  if (coordinator_.joinable() && !pivoted_ && target_.abort && state() == JobState::kCancelled) target_.abort();
  if (coordinator_.joinable()) coordinator_.join();
}

void MirrorJob::SetSpeed(uint64_t bps) {
  MutexLock l(&mu_);
  speed_ = bps;
  next_copy_ = std::chrono::steady_clock::now();
  WakeAll();
}

JobState MirrorJob::WaitReadyOrEnd(int64_t timeout_ms) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  MutexLock l(&mu_);
  while (state_ == JobState::kRunning) {
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) break;
    cv_.WaitFor(&mu_, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1);
  }
  return state_;
}

JobState MirrorJob::state() const {
  MutexLock l(&mu_);
  return state_;
}

config::MirrorReport MirrorJob::Report() const {
  config::MirrorReport r;
  r.id = cfg_.id;
  r.image = image_name_;
  r.target_json = config::MirrorTargetToJson(cfg_.target);
  r.mode = config::ModeName(cfg_.mode);
  r.sync = config::SyncName(cfg_.sync);
  r.copy_on_read = cfg_.copy_on_read;
  r.granularity = g_;
  MutexLock l(&mu_);
  r.state = StateName(state_);
  r.bytes_done = bytes_done_;
  r.bytes_total = std::max(bytes_total_, bytes_done_);
  r.dirty_bytes = dirty_.count() * g_;
  r.speed = speed_;
  // The last full second's rate; after two quiet seconds (or in the first), what was
  // copied since the last mark over the time since it, which falls off when copying stops.
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - rate_mark_).count();
  if (rate_mark_ != started_ && dt < 2.0)
    r.speed_bps = rate_bps_;
  else
    r.speed_bps = dt > 0 ? static_cast<uint64_t>((copied_data_ - rate_mark_bytes_) / dt) : 0;
  r.actively_synced = state_ == JobState::kReady &&
                      (cfg_.mode == config::MirrorJobConfig::Mode::kWriteBlocking || completing_);
  r.error = error_;
  return r;
}

}  // namespace qcowfs::mirror
