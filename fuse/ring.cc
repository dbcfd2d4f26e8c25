#include "fuse/ring.h"

#include <errno.h>
#include <linux/fuse.h>
#include <liburing.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>

#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

#include "fuse/kernel_io.h"
#include "fuse/uring_abi.h"
#include "util/log.h"

namespace qcowfs::fuse {
namespace {

constexpr const char* kParam = "/sys/module/fuse/parameters/enable_uring";
// Room before an entry's payload for the fuse_in_header and the op header, so that a
// request is one contiguous buffer for libfuse without copying the payload.
constexpr size_t kPrefix = 4096;
// user_data of the stop poll (entries are pointers, never this).
constexpr uint64_t kStopTag = 1;

std::string FirstLine(const char* path, bool* exists) {
  std::ifstream f(path);
  *exists = static_cast<bool>(f);
  std::string line;
  if (f) std::getline(f, line);
  return line;
}

// Counts the CPUs of a list like "0-3,5,8-9".
unsigned CountCpuList(const std::string& s) {
  unsigned n = 0;
  size_t i = 0;
  while (i < s.size()) {
    char* end = nullptr;
    unsigned long a = std::strtoul(s.c_str() + i, &end, 10);
    if (end == s.c_str() + i) break;
    unsigned long b = a;
    i = static_cast<size_t>(end - s.c_str());
    if (i < s.size() && s[i] == '-') {
      b = std::strtoul(s.c_str() + i + 1, &end, 10);
      i = static_cast<size_t>(end - s.c_str());
    }
    if (b >= a) n += static_cast<unsigned>(b - a + 1);
    if (i < s.size() && s[i] == ',') i++;
    else break;
  }
  return n;
}

bool CpuOnline(unsigned cpu) {
  char path[96];
  std::snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%u/online", cpu);
  bool exists = false;
  std::string v = FirstLine(path, &exists);
  return !exists || v != "0";  // cpu0 often has no online file
}

}  // namespace

const char* TransportName(Transport t) {
  switch (t) {
    case Transport::kAuto: return "auto";
    case Transport::kLegacy: return "legacy";
    case Transport::kRing: return "ring";
  }
  return "auto";
}

bool ParseTransport(std::string_view s, Transport* t) {
  if (s == "auto") *t = Transport::kAuto;
  else if (s == "legacy") *t = Transport::kLegacy;
  else if (s == "ring") *t = Transport::kRing;
  else return false;
  return true;
}

std::string RingUnavailableReason(bool probe_io_uring) {
  bool exists = false;
  std::string v = FirstLine(kParam, &exists);
  if (!exists) return "this kernel has no FUSE over io_uring (needs Linux 6.14+ with CONFIG_FUSE_IO_URING)";
  if (v != "Y" && v != "1") return std::string("FUSE over io_uring is off (") + kParam + " is " + v + "; as root: echo Y > " + kParam + ")";
  if (probe_io_uring) {
    io_uring ring;
    int rc = io_uring_queue_init(2, &ring, IORING_SETUP_SQE128);
    if (rc < 0) return std::string("io_uring with 128-byte SQEs: ") + std::strerror(-rc);
    io_uring_queue_exit(&ring);
  }
  return "";
}

unsigned PossibleCpus() {
  bool exists = false;
  unsigned n = CountCpuList(FirstLine("/sys/devices/system/cpu/possible", &exists));
  if (n == 0) {
    long c = sysconf(_SC_NPROCESSORS_CONF);
    n = c > 0 ? static_cast<unsigned>(c) : 1;
  }
  return n;
}

// One ring entry: the header buffer and the payload buffer registered with the kernel.
struct RingEntry {
  uring::ReqHeader* hdr = nullptr;
  uint8_t* region = nullptr;  // mmap: kPrefix bytes, then the payload
  size_t region_size = 0;
  uint8_t* payload = nullptr;
  size_t payload_size = 0;
  iovec iov[uring::kRegisterIovecs]{};
  bool alive = false;

  ~RingEntry() {
    if (region) munmap(region, region_size);
    delete hdr;
  }
};

struct FuseRing::Worker {
  unsigned qid = 0;
  std::thread th;
  io_uring ring{};
  bool ring_ok = false;
  RingEntry ent;
};

FuseRing::FuseRing(fuse_session* se, unsigned threads_per_queue, bool required)
    : se_(se), fd_(fuse_session_fd(se)), per_queue_(threads_per_queue ? threads_per_queue : 1), required_(required) {}

FuseRing::~FuseRing() {
  Stop();
  SetInitHook(nullptr);
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

Status FuseRing::Prepare() {
  queues_ = PossibleCpus();
  if (queues_ > 0xffff) return Status::Invalid("too many CPUs for FUSE ring queues");
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) return Status::Error(errno, std::string("eventfd: ") + std::strerror(errno));
  unsigned total = queues_ * per_queue_;
  for (unsigned i = 0; i < total; i++) {
    auto w = std::make_unique<Worker>();
    w->qid = i / per_queue_;
    workers_.push_back(std::move(w));
  }
  for (auto& w : workers_) {
    Worker* p = w.get();
    try {
      p->th = std::thread([this, p] { Main(p); });
    } catch (const std::system_error& e) {
      Stop();
      return Status::Error(EAGAIN, std::string("ring threads: ") + e.what());
    }
  }
  int err;
  {
    MutexLock l(&mu_);
    while (created_ < total) cv_.Wait(&mu_);
    err = create_err_;
  }
  if (err) {
    Stop();
    return Status::Error(err, std::string("io_uring with 128-byte SQEs: ") + std::strerror(err));
  }
  static InitHook hook;
  hook = InitHook{&FuseRing::WantHook, &FuseRing::DoneHook, this};
  SetInitHook(&hook);
  return Status::Ok();
}

bool FuseRing::WantHook(void* ctx) {
  auto* self = static_cast<FuseRing*>(ctx);
  return !self->stopped_.load(std::memory_order_acquire);
}

void FuseRing::DoneHook(void* ctx, bool ok, bool offered, bool taken, size_t payload_size) {
  auto* self = static_cast<FuseRing*>(ctx);
  if (!taken || !ok) {
    self->Fail(!offered ? "the kernel did not offer FUSE over io_uring in INIT" : "the INIT reply failed");
    MutexLock l(&self->mu_);
    self->phase_ = Phase::kStop;
    self->cv_.SignalAll();
    return;
  }
  MutexLock l(&self->mu_);
  self->payload_size_ = payload_size;
  if (self->phase_ == Phase::kWaiting) self->phase_ = Phase::kRegister;
  self->cv_.SignalAll();
}

void FuseRing::Fail(const std::string& why) {
  {
    MutexLock l(&mu_);
    if (!failure_.empty()) return;  // one line, once
    failure_ = why;
  }
  active_.store(false, std::memory_order_release);
  if (required_) {
    QCOWFS_LOG(Error, "transport ring: %s; stopping", why.c_str());
    ::kill(getpid(), SIGTERM);  // the session ends the usual way (Run returns)
  } else {
    QCOWFS_LOG(Warn, "FUSE over io_uring not used: %s; serving through /dev/fuse", why.c_str());
  }
}

std::string FuseRing::failure() const {
  MutexLock l(&mu_);
  return failure_;
}

void FuseRing::Stop() {
  if (stopped_.exchange(true)) return;
  {
    MutexLock l(&mu_);
    phase_ = Phase::kStop;
    cv_.SignalAll();
  }
  if (stop_fd_ >= 0) eventfd_write(stop_fd_, 1);
  for (auto& w : workers_)
    if (w->th.joinable()) w->th.join();
  active_.store(false, std::memory_order_release);
}

void FuseRing::Main(Worker* w) {
  // The io_uring is created in its thread: with SINGLE_ISSUER only the creator submits,
  // and DEFER_TASKRUN runs completions' task work only when the thread waits for them.
  io_uring_params p{};
  p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  int rc = io_uring_queue_init_params(8, &w->ring, &p);
  if (rc == -EINVAL) {
    p = io_uring_params{};
    p.flags = IORING_SETUP_SQE128;
    rc = io_uring_queue_init_params(8, &w->ring, &p);
  }
  w->ring_ok = rc == 0;
  bool serve;
  {
    MutexLock l(&mu_);
    created_++;
    if (rc < 0 && !create_err_) create_err_ = -rc;
    cv_.SignalAll();
    while (phase_ == Phase::kWaiting) cv_.Wait(&mu_);
    serve = phase_ == Phase::kRegister && w->ring_ok;
  }
  if (serve) Serve(w);
  if (w->ring_ok) io_uring_queue_exit(&w->ring);
  w->ring_ok = false;
}

namespace {

// Fills an SQE of IORING_OP_URING_CMD on the FUSE device (the whole 128 bytes).
void PrepCmd(io_uring_sqe* sqe, int fd, uint32_t cmd_op, uint16_t qid, uint64_t commit_id, const iovec* iov,
             void* user_data) {
  if (!sqe) return;
  // A 128-byte SQE: the command area runs 80 bytes past the struct's 64.
  std::memset(static_cast<void*>(sqe), 0, 128);
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = fd;
  sqe->cmd_op = cmd_op;
  if (iov) {
    sqe->addr = reinterpret_cast<uint64_t>(iov);
    sqe->len = uring::kRegisterIovecs;
  }
  uring::CmdReq req{};
  req.commit_id = commit_id;
  req.qid = qid;
  std::memcpy(reinterpret_cast<char*>(sqe) + offsetof(io_uring_sqe, cmd), &req, sizeof(req));
  io_uring_sqe_set_data(sqe, user_data);
}

}  // namespace

void FuseRing::Serve(Worker* w) {
  char name[16];
  std::snprintf(name, sizeof(name), "qcowfs-ring%u", w->qid);
  pthread_setname_np(pthread_self(), name);
  size_t payload_size;
  {
    MutexLock l(&mu_);
    payload_size = payload_size_;
  }
  if (CpuOnline(w->qid)) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->qid, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);  // best effort
  }
  RingEntry& e = w->ent;
  long page = sysconf(_SC_PAGESIZE);
  size_t pg = page > 0 ? static_cast<size_t>(page) : 4096;
  e.payload_size = (payload_size + pg - 1) / pg * pg;
  e.region_size = kPrefix + e.payload_size;
  void* m = mmap(nullptr, e.region_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  e.hdr = new (std::nothrow) uring::ReqHeader{};
  io_uring_sqe* sqe;
  if (m == MAP_FAILED || !e.hdr) {
    if (m != MAP_FAILED) munmap(m, e.region_size);
    // The kernel holds every request until the ring is ready or a REGISTER fails: fail
    // one on purpose (a queue that does not exist) so it goes back to /dev/fuse.
    Fail("no memory for a ring entry");
    static const iovec none[uring::kRegisterIovecs] = {};
    if ((sqe = io_uring_get_sqe(&w->ring))) {
      PrepCmd(sqe, fd_, uring::kCmdRegister, 0xffff, 0, none, nullptr);
      io_uring_submit(&w->ring);
    }
    return;
  }
  e.region = static_cast<uint8_t*>(m);
  e.payload = e.region + kPrefix;
  e.iov[0] = {e.hdr, sizeof(uring::ReqHeader)};
  e.iov[1] = {e.payload, e.payload_size};

  sqe = io_uring_get_sqe(&w->ring);
  io_uring_prep_poll_add(sqe, stop_fd_, POLLIN);
  io_uring_sqe_set_data64(sqe, kStopTag);
  sqe = io_uring_get_sqe(&w->ring);
  PrepCmd(sqe, fd_, uring::kCmdRegister, static_cast<uint16_t>(w->qid), 0, e.iov, &e);
  e.alive = true;
  int rc = io_uring_submit(&w->ring);
  if (rc < 0) {
    e.alive = false;
    Fail(std::string("io_uring_submit: ") + std::strerror(-rc));
    return;
  }
  // A REGISTER the kernel refused completes at once. -EAGAIN: the connection is not
  // initialized yet (the INIT reply is processed as it is written, so not expected);
  // it does not turn the ring off, so try again.
  io_uring_cqe* cqe = nullptr;
  bool registered = true;
  int again = 0;
  while (io_uring_peek_cqe(&w->ring, &cqe) == 0 && cqe) {
    if (cqe->user_data == reinterpret_cast<uint64_t>(&e) && cqe->res == -EAGAIN && again++ < 1000) {
      io_uring_cqe_seen(&w->ring, cqe);
      usleep(1000);
      PrepCmd(io_uring_get_sqe(&w->ring), fd_, uring::kCmdRegister, static_cast<uint16_t>(w->qid), 0, e.iov, &e);
      io_uring_submit(&w->ring);
      continue;
    }
    if (cqe->user_data == reinterpret_cast<uint64_t>(&e) && cqe->res < 0) {
      e.alive = false;
      registered = false;
      Fail(std::string("FUSE_IO_URING_CMD_REGISTER: ") + std::strerror(-cqe->res));
      io_uring_cqe_seen(&w->ring, cqe);
      continue;
    }
    break;  // a request already: served below
  }
  if (!registered) return;
  if (registered_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<int>(workers_.size()) &&
      failure().empty()) {
    active_.store(true, std::memory_order_release);
    QCOWFS_LOG(Info, "FUSE over io_uring: %u queues, %u threads each", queues_, per_queue_);
  }

  bool stop = false;
  while (!stop && e.alive) {
    rc = io_uring_submit_and_wait(&w->ring, 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      QCOWFS_LOG(Error, "FUSE ring queue %u: io_uring_enter: %s", w->qid, std::strerror(-rc));
      break;
    }
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&w->ring, head, cqe) {
      seen++;
      if (cqe->user_data == kStopTag) {
        stop = true;
        continue;
      }
      if (cqe->user_data != reinterpret_cast<uint64_t>(&e)) continue;
      if (cqe->res < 0) {  // -ENOTCONN: the connection ends
        if (cqe->res != -ENOTCONN && cqe->res != -ECANCELED)
          QCOWFS_LOG(Warn, "FUSE ring queue %u: %s", w->qid, std::strerror(-cqe->res));
        e.alive = false;
        continue;
      }
      // The request: fuse_in_header in in_out, the op header in op_in, the rest in
      // the payload. Make it one buffer: the headers go right before the payload.
      fuse_in_header in;
      std::memcpy(&in, e.hdr->in_out, sizeof(in));
      uint32_t payload_sz = e.hdr->ring_ent_in_out.payload_sz;
      uint64_t commit_id = e.hdr->ring_ent_in_out.commit_id;
      auto* out = reinterpret_cast<fuse_out_header*>(e.hdr->in_out);
      RingReply r;
      if (in.len >= sizeof(in) + payload_sz && in.len - sizeof(in) - payload_sz <= uring::kOpInOutSize &&
          payload_sz <= e.payload_size) {
        size_t op_len = in.len - sizeof(in) - payload_sz;
        uint8_t* start = e.payload - op_len - sizeof(in);
        std::memcpy(start, &in, sizeof(in));
        std::memcpy(start + sizeof(in), e.hdr->op_in, op_len);
        r.unique = in.unique;
        r.opcode = in.opcode;
        r.out_header = e.hdr->in_out;
        r.payload = e.payload;
        r.payload_cap = e.payload_size;
        fuse_buf fb{};
        fb.mem = start;
        fb.size = in.len;
        SetThreadRingReply(&r);
        fuse_session_process_buf(se_, &fb);
        SetThreadRingReply(nullptr);
      }
      if (!r.replied) {  // malformed, or no reply in the thread: fail it rather than lose the entry
        std::memset(out, 0, sizeof(*out));
        out->unique = in.unique;
        out->error = -EIO;
      }
      e.hdr->ring_ent_in_out.payload_sz = r.replied ? r.payload_len : 0;
      io_uring_sqe* s = io_uring_get_sqe(&w->ring);
      if (!s) {  // cannot happen (8 SQEs, at most 2 in use)
        io_uring_submit(&w->ring);
        s = io_uring_get_sqe(&w->ring);
      }
      PrepCmd(s, fd_, uring::kCmdCommitAndFetch, static_cast<uint16_t>(w->qid), commit_id, nullptr, &e);
    }
    io_uring_cq_advance(&w->ring, seen);
  }
  io_uring_submit(&w->ring);  // a commit made in the last round still goes out
  if (e.alive && !stop) active_.store(false, std::memory_order_release);
}

}  // namespace qcowfs::fuse
