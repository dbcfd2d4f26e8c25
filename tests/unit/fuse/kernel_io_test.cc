// kernel_io: the /dev/fuse read hook. libfuse's worker loop (fuse_do_work) ends the whole
// session on any read error but EINTR (ENOENT is retried one level below), so the hook
// must never hand it EAGAIN. A pipe stands in for the device: both are read with read(2),
// block or fail with EAGAIN by O_NONBLOCK on the open file description, and poll alike.
#include "fuse/kernel_io.h"

#include <doctest/doctest.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
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

}  // namespace
}  // namespace qcowfs::fuse
