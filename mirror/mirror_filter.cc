#include "mirror/mirror_filter.h"

#include "mirror/mirror_job.h"

namespace qcowfs::mirror {

Status MirrorFilter::Read(uint64_t offset, void* buf, size_t len) {
  ReaderMostlyShared l(&io_mu_);
  if (job_) return job_->GuestRead(lower_, offset, buf, len);
  return lower_->Read(offset, buf, len);
}

Status MirrorFilter::Write(uint64_t offset, const void* buf, size_t len) {
  ReaderMostlyShared l(&io_mu_);
  bool claimed = job_ && job_->BeforeGuestWrite(offset, len);
  Status s = lower_->Write(offset, buf, len);
  if (job_) job_->AfterGuestWrite(offset, len, buf, false, claimed, s.ok());
  return s;
}

Status MirrorFilter::WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) {
  ReaderMostlyShared l(&io_mu_);
  bool claimed = job_ && job_->BeforeGuestWrite(offset, len);
  Status s = lower_->WriteZeroes(offset, len, may_unmap);
  if (job_) job_->AfterGuestWrite(offset, len, nullptr, may_unmap, claimed, s.ok());
  return s;
}

Status MirrorFilter::Discard(uint64_t offset, uint64_t len) {
  ReaderMostlyShared l(&io_mu_);
  // A discarded range reads zeros: the target gets zeros (never a TRIM alone).
  uint64_t n = std::min<uint64_t>(len, lower_->Size() - std::min(offset, lower_->Size()));
  bool claimed = job_ && job_->BeforeGuestWrite(offset, n);
  Status s = lower_->Discard(offset, len);
  if (job_) job_->AfterGuestWrite(offset, n, nullptr, true, claimed, s.ok());
  return s;
}

Status MirrorFilter::Flush() {
  ReaderMostlyShared l(&io_mu_);
  return lower_->Flush();
}

void MirrorFilter::StartWriteback() {
  ReaderMostlyShared l(&io_mu_);
  lower_->StartWriteback();
}

Result<block::BlockStatus> MirrorFilter::GetBlockStatus(uint64_t offset, uint64_t len) {
  ReaderMostlyShared l(&io_mu_);
  return lower_->GetBlockStatus(offset, len);
}

uint64_t MirrorFilter::Size() const {
  ReaderMostlyShared l(&io_mu_);
  return lower_->Size();
}

Status MirrorFilter::Allocate(uint64_t offset, uint64_t len) {
  ReaderMostlyShared l(&io_mu_);
  RETURN_IF_ERROR(lower_->Allocate(offset, len));
  // Preallocation does not change what the range reads: nothing for the target.
  return Status::Ok();
}

Status MirrorFilter::Resize(uint64_t new_size) {
  ReaderMostlyShared l(&io_mu_);
  if (job_) return Status::Error(EBUSY, "a mirror job is running on this image; it cannot grow until the job ends");
  return lower_->Resize(new_size);
}

bool MirrorFilter::read_only() const {
  ReaderMostlyShared l(&io_mu_);
  return lower_->read_only();
}

uint64_t MirrorFilter::AllocatedBytes() const {
  ReaderMostlyShared l(&io_mu_);
  return lower_->AllocatedBytes();
}

block::BlockDevice* MirrorFilter::lower() const {
  ReaderMostlyShared l(&io_mu_);
  return lower_;
}

bool MirrorFilter::has_job() const {
  ReaderMostlyShared l(&io_mu_);
  return job_ != nullptr;
}

}  // namespace qcowfs::mirror
