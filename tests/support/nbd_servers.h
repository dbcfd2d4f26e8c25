// Real NBD servers for tests: qemu-nbd and nbdkit started as children of the test (on a
// Unix socket or 127.0.0.1), ready once a client connects, stopped by PID (SIGTERM, then
// SIGKILL) and killed with the test binary; plus sockets that never speak NBD.
#pragma once

#include <arpa/inet.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::testing {
namespace nbd_servers_detail {
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
}  // namespace nbd_servers_detail
using namespace nbd_servers_detail;

// --- servers and sockets -------------------------------------------------------------------

inline std::string FindInPath(const std::string& name) {
  const char* path = getenv("PATH");
  std::stringstream ss(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    std::string p = (dir.empty() ? "." : dir) + "/" + name;
    if (access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

inline std::string ReadWholeFile(const std::string& path) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

inline bool UnixConnects(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path.c_str());
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
  close(fd);
  return ok;
}

inline bool TcpConnects(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0;
  close(fd);
  return ok;
}

// A listening socket on 127.0.0.1 (port 0: any free one). Never accepts: the kernel
// completes connections into the backlog and nothing is ever said on them.
inline int ListenTcp(int* port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  REQUIRE(listen(fd, 16) == 0);
  socklen_t len = sizeof(sa);
  REQUIRE(getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len) == 0);
  *port = ntohs(sa.sin_port);
  return fd;
}

inline int ListenUnix(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path.c_str());
  REQUIRE(bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  REQUIRE(listen(fd, 16) == 0);
  return fd;
}

// A port nobody listens on (bound once, then released).
inline int FreePort() {
  int port = 0;
  close(ListenTcp(&port));
  return port;
}

// A server (or any background) process: started with stdout/stderr into a log file,
// killed with the test binary (PR_SET_PDEATHSIG) or by PID on destruction (SIGTERM, then
// SIGKILL). ready() is polled until true (a client connects; or at once for a plain job).
class Server {
 public:
  Server(const std::vector<std::string>& argv, std::string log, const std::function<bool()>& ready)
      : log_(std::move(log)) {
    std::string exe = FindInPath(argv[0]);
    REQUIRE_MESSAGE(!exe.empty(), argv[0] << " not found");
    std::vector<char*> cargv;
    for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    fflush(stdout);
    fflush(stderr);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      int in = open("/dev/null", O_RDONLY);
      int out = open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
      if (in < 0 || out < 0) _exit(126);
      dup2(in, 0);
      dup2(out, 1);
      dup2(out, 2);
      execv(exe.c_str(), cargv.data());
      _exit(127);
    }
    Clock::time_point until = Clock::now() + 20s;
    while (!ready()) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        FAIL("server exited before it was ready: " << argv[0] << "\n" << Log());
      }
      if (Clock::now() > until) FAIL("server not ready after 20 s: " << Log());
      std::this_thread::sleep_for(20ms);
    }
  }
  ~Server() {
    if (pid_ <= 0) return;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 250; ++i) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) return;
      std::this_thread::sleep_for(20ms);
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  std::string Log() const { return ReadWholeFile(log_); }
  pid_t pid() const { return pid_; }

  // Sends sig to the process (a server killed mid-test) and reaps it.
  void Kill(int sig = SIGKILL) {
    REQUIRE(pid_ > 0);
    REQUIRE(kill(pid_, sig) == 0);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

  // Waits at most timeout_ms for the process to exit by itself: its exit status (128+N if
  // killed by signal N), or -1 if it is still running (it is left running).
  int WaitExit(int timeout_ms) {
    if (pid_ <= 0) return -1;
    Clock::time_point until = Clock::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (Clock::now() > until) return -1;
      std::this_thread::sleep_for(10ms);
    }
  }

 private:
  std::string log_;
  pid_t pid_ = -1;
};

inline std::string UnixUri(const std::string& sock) { return "nbd+unix:///?socket=" + sock; }

// qemu-nbd serving a raw file on a Unix socket (persistent: the readiness probe is a client).
inline std::unique_ptr<Server> StartQemuNbd(const TempDir& dir, const std::string& file,
                                     std::vector<std::string> extra = {}) {
  RequireTool("qemu-nbd");
  std::string sock = dir.File("qemu-nbd.sock");
  std::vector<std::string> argv = {"qemu-nbd", "-f", "raw", "-t", "-k", sock};
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(file);
  return std::make_unique<Server>(argv, dir.File("qemu-nbd.log"), [sock] { return UnixConnects(sock); });
}

// nbdkit on a Unix socket: args are filters, the plugin and its parameters.
inline std::unique_ptr<Server> StartNbdkitUnix(const TempDir& dir, const std::string& sock,
                                        const std::vector<std::string>& args) {
  RequireTool("nbdkit");
  std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent", "-U", sock};
  argv.insert(argv.end(), args.begin(), args.end());
  return std::make_unique<Server>(argv, dir.File("nbdkit.log"), [sock] { return UnixConnects(sock); });
}

// nbdkit on 127.0.0.1:port (args as for StartNbdkitUnix); its URI is nbd://127.0.0.1:PORT/.
inline std::unique_ptr<Server> StartNbdkitTcp(const TempDir& dir, int port, const std::vector<std::string>& args) {
  RequireTool("nbdkit");
  std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", std::to_string(port)};
  argv.insert(argv.end(), args.begin(), args.end());
  return std::make_unique<Server>(argv, dir.File("nbdkit.log"), [port] { return TcpConnects(port); });
}

inline std::string TcpUri(int port) { return "nbd://127.0.0.1:" + std::to_string(port) + "/"; }

// NBD requests (Read, Write, Zero, Flush, ...) that reached an nbdkit whose outermost filter
// is `--filter=log logfile=LOG`: the request lines, not their "...Write id=N return=" replies.
inline int NbdkitRequestsLogged(const std::string& log) {
  std::stringstream ss(ReadWholeFile(log));
  std::string line;
  int n = 0;
  while (std::getline(ss, line)) {
    size_t c = line.find("connection=");
    if (c == std::string::npos || line.find(" id=") == std::string::npos) continue;
    size_t sp = line.find(' ', c);
    if (sp != std::string::npos && sp + 1 < line.size() && line[sp + 1] != '.' &&
        line.compare(sp + 1, 8, "Connect ") != 0)
      n++;
  }
  return n;
}

// Sends one command character to nbdkit's pause filter and waits for its echo.
inline void PauseControl(const std::string& ctl, char cmd) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", ctl.c_str());
  REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) == 0);
  REQUIRE(write(fd, &cmd, 1) == 1);
  char echo = 0;
  REQUIRE(read(fd, &echo, 1) == 1);
  CHECK(echo == cmd - 'a' + 'A');
  close(fd);
}

}  // namespace qcowfs::testing
