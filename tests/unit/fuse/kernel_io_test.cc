// kernel_io: the /dev/fuse read hook. libfuse's worker loop (fuse_do_work) ends the whole
// session on any read error but EINTR (ENOENT is retried one level below), so the hook
// must never hand it EAGAIN. A pipe stands in for the device: both are read with read(2),
// block or fail with EAGAIN by O_NONBLOCK on the open file description, and poll alike.
#include "fuse/kernel_io.h"

#include <linux/fuse.h>

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>
#include <string>
#include <thread>
#include <vector>

namespace qcowfs::fuse {
namespace {

// The scheduler state of thread tid of this process ('S': asleep in a system call).
char ThreadState(pid_t tid) {
  std::ifstream f("/proc/self/task/" + std::to_string(tid) + "/stat");
  std::string line;
  std::getline(f, line);
  auto close_paren = line.rfind(')');
  return close_paren == std::string::npos || close_paren + 2 >= line.size() ? '?' : line[close_paren + 2];
}

TEST_CASE("kernel_io: a worker whose shared device fd turned non-blocking waits, it never returns EAGAIN") {
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  std::vector<char> request(80, 0);
  std::strcpy(request.data() + 40, "first");
  std::vector<char> buf(4096);

  // A first request through the plain (blocking) path: the worker now knows its fd as blocking.
  REQUIRE(write(p[1], request.data(), request.size()) == static_cast<ssize_t>(request.size()));
  REQUIRE(ReadRequest(p[0], buf.data(), buf.size(), nullptr) == static_cast<ssize_t>(request.size()));

  // Another worker on the same open file description (libfuse shares one fd when it
  // cannot clone the device) switches it to non-blocking to poll.
  int fl = fcntl(p[0], F_GETFL);
  REQUIRE(fcntl(p[0], F_SETFL, fl | O_NONBLOCK) == 0);

  // The queue is empty: the read must wait for the next request. The request is sent
  // only once this thread sleeps, so a read that does not wait sees an empty queue.
  const pid_t me = static_cast<pid_t>(syscall(SYS_gettid));
  std::atomic<bool> done{false};
  std::strcpy(request.data() + 40, "second");
  std::thread sender([&] {
    while (!done.load()) {
      if (ThreadState(me) == 'S') {
        (void)!write(p[1], request.data(), request.size());
        return;
      }
      std::this_thread::yield();
    }
  });
  errno = 0;
  ssize_t n = ReadRequest(p[0], buf.data(), buf.size(), nullptr);
  int err = errno;
  done.store(true);
  sender.join();
  INFO("read returned " << n << ", errno " << err << " (" << std::string(std::strerror(err)) << ")");
  CHECK(n == static_cast<ssize_t>(request.size()));
  if (n > 0) CHECK(std::string(buf.data() + 40) == "second");
  close(p[0]);
  close(p[1]);
}

TEST_CASE("kernel_io: end of the device and other errors still reach libfuse") {
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  close(p[1]);
  std::vector<char> buf(4096);
  CHECK(ReadRequest(p[0], buf.data(), buf.size(), nullptr) == 0);  // EOF
  close(p[0]);
  errno = 0;
  CHECK(ReadRequest(p[0], buf.data(), buf.size(), nullptr) == -1);
  CHECK(errno == EBADF);
}


// --- FUSE over io_uring: ring replies and the INIT negotiation -----------------------

TEST_CASE("kernel_io: a ring thread's reply goes into its ring entry, any other reply to the device") {
  fuse_out_header entry_out{};
  std::vector<uint8_t> payload(64, 0xee);
  RingReply r;
  r.unique = 42;
  r.out_header = &entry_out;
  r.payload = payload.data();
  r.payload_cap = payload.size();
  SetThreadRingReply(&r);

  fuse_out_header oh{};
  oh.unique = 42;
  oh.error = 0;
  char a[] = "abc", b[] = "defgh";
  iovec iov[3] = {{&oh, sizeof(oh)}, {a, 3}, {b, 5}};
  // fd -1: a write to the device would fail with EBADF.
  CHECK(WriteReply(-1, iov, 3, nullptr) == static_cast<ssize_t>(sizeof(oh) + 8));
  CHECK(r.replied);
  CHECK(r.payload_len == 8);
  CHECK(entry_out.unique == 42);
  CHECK(std::memcmp(payload.data(), "abcdefgh", 8) == 0);
  CHECK(payload[8] == 0xee);

  // A reply with another unique (e.g. libfuse's EAGAIN to a stale interrupt) goes to the device.
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  fuse_out_header other{};
  other.unique = 7;
  other.error = -EAGAIN;
  other.len = sizeof(other);
  iovec iov2[1] = {{&other, sizeof(other)}};
  CHECK(WriteReply(p[1], iov2, 1, nullptr) == static_cast<ssize_t>(sizeof(other)));
  fuse_out_header got{};
  CHECK(read(p[0], &got, sizeof(got)) == static_cast<ssize_t>(sizeof(got)));
  CHECK(got.unique == 7);
  SetThreadRingReply(nullptr);
  // Without a ring entry, the reply with unique 42 goes to the device too.
  CHECK(WriteReply(p[1], iov, 3, nullptr) == static_cast<ssize_t>(sizeof(oh) + 8));
  close(p[0]);
  close(p[1]);
}

// Without FOPEN_PARALLEL_DIRECT_WRITES the kernel takes the inode lock for every direct
// write, so writes to the mounted file run one at a time (libfuse 3.14 cannot set it):
// both transports must add it to OPEN replies of direct-io files.
fuse_open_out OpenReplyThroughHook(int fd, uint32_t open_flags, int32_t error) {
  fuse_out_header oh{};
  oh.unique = 9;
  oh.error = error;
  oh.len = sizeof(oh) + sizeof(fuse_open_out);
  fuse_open_out arg{};
  arg.fh = 5;
  arg.open_flags = open_flags;
  iovec iov[2] = {{&oh, sizeof(oh)}, {&arg, sizeof(arg)}};
  WriteReply(fd, iov, 2, nullptr);
  return arg;
}

TEST_CASE("kernel_io: OPEN replies of direct-io files get FOPEN_PARALLEL_DIRECT_WRITES on both transports") {
  SUBCASE("ring: the reply copied into the entry") {
    for (uint32_t opcode : {static_cast<uint32_t>(FUSE_OPEN), static_cast<uint32_t>(FUSE_CREATE)}) {
      for (uint32_t flags : {static_cast<uint32_t>(FOPEN_DIRECT_IO), 0u}) {
        CAPTURE(opcode);
        CAPTURE(flags);
        fuse_out_header entry_out{};
        std::vector<uint8_t> payload(256, 0);
        RingReply r;
        r.unique = 9;
        r.opcode = opcode;
        r.out_header = &entry_out;
        r.payload = payload.data();
        r.payload_cap = payload.size();
        SetThreadRingReply(&r);
        OpenReplyThroughHook(-1, flags, 0);
        SetThreadRingReply(nullptr);
        REQUIRE(r.replied);
        REQUIRE(r.payload_len == sizeof(fuse_open_out));
        fuse_open_out got{};
        std::memcpy(&got, payload.data(), sizeof(got));
        CHECK(got.fh == 5);
        bool want = opcode == FUSE_OPEN && (flags & FOPEN_DIRECT_IO);
        CHECK(((got.open_flags & FOPEN_PARALLEL_DIRECT_WRITES) != 0) == want);
        CHECK((got.open_flags & FOPEN_DIRECT_IO) == flags);
      }
    }
  }
  SUBCASE("/dev/fuse: the OPEN request read through the hook, its reply written") {
    int p[2];
    REQUIRE(pipe2(p, O_CLOEXEC) == 0);
    for (int32_t error : {0, -EACCES}) {
      CAPTURE(error);
      fuse_in_header in{};
      in.len = sizeof(in) + sizeof(fuse_open_in);
      in.opcode = FUSE_OPEN;
      in.unique = 9;
      std::vector<uint8_t> req(in.len, 0);
      std::memcpy(req.data(), &in, sizeof(in));
      REQUIRE(write(p[1], req.data(), req.size()) == static_cast<ssize_t>(req.size()));
      std::vector<uint8_t> buf(4096);
      REQUIRE(ReadRequest(p[0], buf.data(), buf.size(), nullptr) == static_cast<ssize_t>(req.size()));
      fuse_open_out sent = OpenReplyThroughHook(p[1], FOPEN_DIRECT_IO, error);
      fuse_out_header oh{};
      fuse_open_out got{};
      REQUIRE(read(p[0], &oh, sizeof(oh)) == static_cast<ssize_t>(sizeof(oh)));
      REQUIRE(read(p[0], &got, sizeof(got)) == static_cast<ssize_t>(sizeof(got)));
      CHECK(got.open_flags == sent.open_flags);
      CHECK(((got.open_flags & FOPEN_PARALLEL_DIRECT_WRITES) != 0) == (error == 0));
      // The next reply with that unique is not an OPEN's any more: left alone.
      fuse_open_out again = OpenReplyThroughHook(p[1], FOPEN_DIRECT_IO, 0);
      REQUIRE(read(p[0], &oh, sizeof(oh)) == static_cast<ssize_t>(sizeof(oh)));
      REQUIRE(read(p[0], &got, sizeof(got)) == static_cast<ssize_t>(sizeof(got)));
      CHECK((again.open_flags & FOPEN_PARALLEL_DIRECT_WRITES) == 0);
    }
    close(p[0]);
    close(p[1]);
  }
}

TEST_CASE("kernel_io: a reply built in the ring entry's payload (ThreadRingPayload) is not copied") {
  CHECK(ThreadRingPayload(1) == nullptr);  // not in a ring thread
  fuse_out_header entry_out{};
  std::vector<uint8_t> payload(4096, 0);
  RingReply r;
  r.unique = 9;
  r.out_header = &entry_out;
  r.payload = payload.data();
  r.payload_cap = payload.size();
  SetThreadRingReply(&r);
  CHECK(ThreadRingPayload(8192) == nullptr);  // too large
  uint8_t* buf = ThreadRingPayload(4096);
  REQUIRE(buf == payload.data());
  std::memset(buf, 0x33, 4096);
  fuse_out_header oh{};
  oh.unique = 9;
  iovec iov[2] = {{&oh, sizeof(oh)}, {buf, 4096}};
  CHECK(WriteReply(-1, iov, 2, nullptr) == static_cast<ssize_t>(sizeof(oh) + 4096));
  CHECK(r.payload_len == 4096);
  CHECK(payload[4095] == 0x33);
  CHECK(ThreadRingPayload(1) == nullptr);  // replied
  SetThreadRingReply(nullptr);
}

struct HookLog {
  bool want = true;
  int calls = 0;
  bool ok = false, offered = false, taken = false;
  size_t payload = 0;
};

// Feeds an INIT request (offering `flags`, flags2) through the read hook, then its reply
// (max_write, max_pages) through the write hook; returns the reply's flags and flags2.
std::pair<uint32_t, uint32_t> NegotiateInit(uint32_t flags, uint32_t flags2, HookLog* log, uint64_t unique) {
  static HookLog* current = nullptr;
  current = log;
  static const InitHook hook = {
      [](void*) { return current->want; },
      [](void*, bool ok, bool offered, bool taken, size_t payload) {
        current->calls++;
        current->ok = ok;
        current->offered = offered;
        current->taken = taken;
        current->payload = payload;
      },
      nullptr};
  SetInitHook(&hook);
  int p[2];
  REQUIRE(pipe2(p, O_CLOEXEC) == 0);
  struct {
    fuse_in_header h;
    fuse_init_in in;
  } req{};
  req.h.len = sizeof(req);
  req.h.opcode = FUSE_INIT;
  req.h.unique = unique;
  req.in.major = 7;
  req.in.minor = 42;
  req.in.flags = flags;
  req.in.flags2 = flags2;
  REQUIRE(write(p[1], &req, sizeof(req)) == static_cast<ssize_t>(sizeof(req)));
  std::vector<char> buf(4096);
  REQUIRE(ReadRequest(p[0], buf.data(), buf.size(), nullptr) == static_cast<ssize_t>(sizeof(req)));

  fuse_out_header oh{};
  oh.unique = unique;
  oh.len = sizeof(oh) + sizeof(fuse_init_out);
  fuse_init_out out{};
  out.major = 7;
  out.minor = 38;
  out.flags = FUSE_ASYNC_READ;
  out.max_write = 1 << 20;
  out.max_pages = 256;
  iovec iov[2] = {{&oh, sizeof(oh)}, {&out, sizeof(out)}};
  CHECK(WriteReply(p[1], iov, 2, nullptr) == static_cast<ssize_t>(sizeof(oh) + sizeof(out)));
  SetInitHook(nullptr);
  close(p[0]);
  close(p[1]);
  return {out.flags, out.flags2};
}

TEST_CASE("kernel_io: the INIT reply takes FUSE_OVER_IO_URING only when offered and wanted") {
  const uint32_t ring2 = 1u << 9;  // FUSE_OVER_IO_URING in flags2
  SUBCASE("offered and wanted") {
    HookLog log;
    auto [f, f2] = NegotiateInit(FUSE_ASYNC_READ | FUSE_INIT_EXT, ring2, &log, 1001);
    CHECK((f & FUSE_INIT_EXT) != 0);
    CHECK((f2 & ring2) != 0);
    CHECK((f & FUSE_ASYNC_READ) != 0);
    CHECK(log.calls == 1);
    CHECK(log.ok);
    CHECK(log.offered);
    CHECK(log.taken);
    CHECK(log.payload == (1u << 20));
  }
  SUBCASE("offered, not wanted") {
    HookLog log;
    log.want = false;
    auto [f, f2] = NegotiateInit(FUSE_ASYNC_READ | FUSE_INIT_EXT, ring2, &log, 1002);
    CHECK((f2 & ring2) == 0);
    CHECK(log.calls == 1);
    CHECK(log.offered);
    CHECK_FALSE(log.taken);
  }
  SUBCASE("offered with FUSE_DIRECT_IO_ALLOW_MMAP: the reply takes both") {
    HookLog log;
    const uint32_t mmap2 = 1u << 4;  // FUSE_DIRECT_IO_ALLOW_MMAP in flags2
    auto [f, f2] = NegotiateInit(FUSE_ASYNC_READ | FUSE_INIT_EXT, ring2 | mmap2, &log, 1004);
    CHECK((f & FUSE_INIT_EXT) != 0);
    CHECK((f2 & ring2) != 0);
    CHECK((f2 & mmap2) != 0);
    CHECK(log.taken);
  }
  SUBCASE("not offered (the kernel's parameter off)") {
    HookLog log;
    auto [f, f2] = NegotiateInit(FUSE_ASYNC_READ | FUSE_INIT_EXT, 0, &log, 1003);
    CHECK((f2 & ring2) == 0);
    CHECK(log.calls == 1);
    CHECK_FALSE(log.offered);
    CHECK_FALSE(log.taken);
  }
}

}  // namespace
}  // namespace qcowfs::fuse
