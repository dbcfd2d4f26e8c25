// The control socket with real Unix sockets: clients that stay connected (a watcher, or
// one that sent half a line) never hold up another client's request.
#include <doctest/doctest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <vector>

#include "daemon/control_server.h"
#include "support/temp_dir.h"
#include "util/fd.h"

namespace qcowfs::daemon {
namespace {

UniqueFd Connect(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::memcpy(a.sun_path, path.c_str(), path.size());
  REQUIRE(::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0);
  return fd;
}

TEST_CASE("control server: idle and half-written connections do not hold up other clients") {
  testing::TempDir dir("qcowfs-ctl");
  ControlServer srv(dir.File("ctl.sock"));
  srv.Register("ping", [](const std::string&) -> Result<std::string> { return std::string("{\"pong\": true}"); });
  REQUIRE(srv.Bind().ok());
  srv.Start();
  // A watcher that asked once and stays connected, one that stays silent, and one that
  // sent half a request.
  UniqueFd watcher = Connect(srv.path()), silent = Connect(srv.path()), half = Connect(srv.path());
  std::string req = "{\"cmd\": \"ping\"}\n";
  REQUIRE(::write(watcher.get(), req.data(), req.size()) == static_cast<ssize_t>(req.size()));
  char buf[256];
  REQUIRE(::read(watcher.get(), buf, sizeof(buf)) > 0);
  REQUIRE(::write(half.get(), "{\"cmd\": ", 8) == 8);
  for (int i = 0; i < 3; i++) {
    auto f = std::async(std::launch::async, [&] { return ControlCall(srv.path(), "ping"); });
    REQUIRE_MESSAGE(f.wait_for(std::chrono::seconds(3)) == std::future_status::ready,
                    "a request waited for another client's connection");
    auto r = f.get();
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    CHECK(r.value().find("pong") != std::string::npos);
  }
  // The half-written request completes on its own connection and is answered there.
  std::string rest = "\"ping\"}\n";
  REQUIRE(::write(half.get(), rest.data(), rest.size()) == static_cast<ssize_t>(rest.size()));
  ssize_t n = ::read(half.get(), buf, sizeof(buf));
  REQUIRE(n > 0);
  CHECK(std::string(buf, static_cast<size_t>(n)).find("pong") != std::string::npos);
  // The watcher's connection is still served.
  REQUIRE(::write(watcher.get(), req.data(), req.size()) == static_cast<ssize_t>(req.size()));
  n = ::read(watcher.get(), buf, sizeof(buf));
  REQUIRE(n > 0);
  CHECK(std::string(buf, static_cast<size_t>(n)).find("pong") != std::string::npos);
  srv.Stop();
}

}  // namespace
}  // namespace qcowfs::daemon
