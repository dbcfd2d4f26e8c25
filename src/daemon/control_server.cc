#include "daemon/control_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <vector>

#include "config/control_protocol.h"
#include "util/log.h"

namespace qcowfs::daemon {
namespace {

constexpr size_t kMaxLine = 1 << 20;
constexpr size_t kMaxClients = 64;
constexpr auto kIdleTimeout = std::chrono::seconds(60);

Status MakeAddr(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) return Status::Invalid(path + ": socket path too long");
  std::memcpy(addr->sun_path, path.c_str(), path.size());
  return Status::Ok();
}

Status MakeDirs(const std::string& dir) {
  if (dir.empty()) return Status::Ok();
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) return Status::Ok();
  auto slash = dir.rfind('/');
  if (slash != std::string::npos && slash > 0) RETURN_IF_ERROR(MakeDirs(dir.substr(0, slash)));
  if (::mkdir(dir.c_str(), 0700) < 0 && errno != EEXIST)
    return Status::Error(errno, ErrnoMessage(dir, errno));
  return Status::Ok();
}

}  // namespace

ControlServer::~ControlServer() { Stop(); }

Status ControlServer::Bind() {
  sockaddr_un addr;
  RETURN_IF_ERROR(MakeAddr(path_, &addr));
  auto slash = path_.rfind('/');
  if (slash != std::string::npos) RETURN_IF_ERROR(MakeDirs(path_.substr(0, slash)));
  // A socket left by a dead daemon is replaced; a live one is an error.
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0)
    return Status::Error(EADDRINUSE, path_ + ": control socket is in use by another qcowfs");
  ::unlink(path_.c_str());
  listen_fd_ = UniqueFd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listen_fd_.valid()) return Status::Error(errno, ErrnoMessage("socket", errno));
  mode_t old = ::umask(0177);
  int rc = ::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::umask(old);
  if (rc < 0) return Status::Error(errno, ErrnoMessage(path_, errno));
  ::chmod(path_.c_str(), 0600);
  if (::listen(listen_fd_.get(), 16) < 0) return Status::Error(errno, ErrnoMessage(path_, errno));
  return Status::Ok();
}

void ControlServer::Start() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) < 0) return;
  stop_r_ = UniqueFd(p[0]);
  stop_w_ = UniqueFd(p[1]);
  thread_ = std::thread([this] { Loop(); });
}

void ControlServer::Stop() {
  if (thread_.joinable()) {
    char c = 1;
    (void)!::write(stop_w_.get(), &c, 1);
    thread_.join();
  }
  if (listen_fd_.valid()) {
    listen_fd_.Reset();
    ::unlink(path_.c_str());
  }
}

// One thread serves every connection: poll() over the listening socket and the clients,
// so a client that stays connected (a watcher polling status, or one that sent half a
// line) never holds up another. Requests still run one at a time, in arrival order.
void ControlServer::Loop() {
  struct Client {
    UniqueFd fd;
    std::string buf;
    std::chrono::steady_clock::time_point last;
  };
  std::vector<Client> clients;
  std::vector<pollfd> fds;
  for (;;) {
    fds.clear();
    fds.push_back({stop_r_.get(), POLLIN, 0});
    fds.push_back({listen_fd_.get(), POLLIN, 0});
    for (const auto& c : clients) fds.push_back({c.fd.get(), POLLIN, 0});
    if (::poll(fds.data(), fds.size(), 1000) < 0) {
      if (errno == EINTR) continue;
      return;
    }
    if (fds[0].revents) return;
    const auto now = std::chrono::steady_clock::now();
    std::vector<bool> drop(clients.size(), false);
    for (size_t i = 0; i < clients.size(); i++) {
      Client& c = clients[i];
      short ev = fds[i + 2].revents;
      if (ev == 0) {
        drop[i] = now - c.last > kIdleTimeout;  // idle clients are dropped
        continue;
      }
      char chunk[4096];
      ssize_t n = ::read(c.fd.get(), chunk, sizeof(chunk));
      if (n <= 0) {
        drop[i] = !(n < 0 && (errno == EINTR || errno == EAGAIN));
        continue;
      }
      c.last = now;
      c.buf.append(chunk, static_cast<size_t>(n));
      drop[i] = !ServeLines(c.fd.get(), &c.buf);
    }
    for (size_t i = clients.size(); i-- > 0;)
      if (drop[i]) clients.erase(clients.begin() + static_cast<std::ptrdiff_t>(i));
    if (fds[1].revents & POLLIN) {
      UniqueFd c(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (c.valid()) {
        if (clients.size() >= kMaxClients) {
          std::string reply = config::FormatErrorReply("too many control connections");
          (void)!::write(c.get(), reply.data(), reply.size());
        } else {
          clients.push_back(Client{std::move(c), std::string(), std::chrono::steady_clock::now()});
        }
      }
    }
  }
}

// Answers every whole line in *buf; false when the connection should be closed.
bool ControlServer::ServeLines(int fd, std::string* buf) {
  size_t nl;
  while ((nl = buf->find('\n')) != std::string::npos) {
    std::string line = buf->substr(0, nl);
    buf->erase(0, nl + 1);
    std::string reply = Handle(line);
    size_t off = 0;
    while (off < reply.size()) {
      ssize_t w = ::write(fd, reply.data() + off, reply.size() - off);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return false;
      off += static_cast<size_t>(w);
    }
  }
  if (buf->size() > kMaxLine) {
    std::string reply = config::FormatErrorReply("malformed request: line too long");
    (void)!::write(fd, reply.data(), reply.size());
    return false;
  }
  return true;
}

std::string ControlServer::Handle(const std::string& line) {
  try {
    return Dispatch(line);
  } catch (const std::exception& e) {  // a handler bug must not take the daemon down
    return config::FormatErrorReply(std::string("internal error: ") + e.what());
  }
}

std::string ControlServer::Dispatch(const std::string& line) {
  auto req = config::ParseControlRequest(line);
  if (!req.ok()) return config::FormatErrorReply(req.status().message());
  auto it = handlers_.find(req.value().cmd);
  if (it == handlers_.end()) return config::FormatErrorReply("unknown command \"" + req.value().cmd + "\"");
  Result<std::string> r = it->second(req.value().args_json);
  if (!r.ok()) return config::FormatErrorReply(r.status().message());
  return config::FormatOkReply(r.value());
}

Result<std::string> ControlCall(const std::string& socket_path, const std::string& cmd,
                               const std::string& args_json) {
  sockaddr_un addr;
  RETURN_IF_ERROR(MakeAddr(socket_path, &addr));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0)
    return Status::Error(errno, socket_path + ": cannot reach the qcowfs daemon: " + std::strerror(errno));
  std::string req = config::FormatRequest(cmd, args_json);
  size_t off = 0;
  while (off < req.size()) {
    ssize_t w = ::write(fd.get(), req.data() + off, req.size() - off);
    if (w <= 0) return Status::IoError(socket_path + ": write failed");
    off += static_cast<size_t>(w);
  }
  std::string buf;
  char chunk[4096];
  while (buf.find('\n') == std::string::npos) {
    ssize_t n = ::read(fd.get(), chunk, sizeof(chunk));
    if (n <= 0) return Status::IoError(socket_path + ": the daemon closed the connection");
    buf.append(chunk, static_cast<size_t>(n));
  }
  return config::ParseReply(buf.substr(0, buf.find('\n')));
}

}  // namespace qcowfs::daemon
