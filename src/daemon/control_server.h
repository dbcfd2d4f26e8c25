// ControlServer: the daemon's Unix control socket (mode 0600). One request per
// line, one reply per request; a malformed request gets an error reply and the
// connection stays usable. Handlers run on the control thread, one request at a time;
// any number of clients (up to 64) may stay connected, idle ones are closed after 60 s.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <thread>

#include "util/fd.h"
#include "util/status.h"

namespace qcowfs::daemon {

class ControlServer {
 public:
  using Handler = std::function<Result<std::string>(const std::string& args_json)>;

  explicit ControlServer(std::string path) : path_(std::move(path)) {}
  ~ControlServer();

  void Register(const std::string& cmd, Handler h) { handlers_[cmd] = std::move(h); }
  // Creates the socket (and its directory, mode 0700). Fails if a live daemon owns it.
  Status Bind();
  // Serves on a thread until Stop().
  void Start();
  void Stop();
  const std::string& path() const { return path_; }

 private:
  void Loop();
  bool ServeLines(int fd, std::string* buf);
  std::string Handle(const std::string& line);
  std::string Dispatch(const std::string& line);

  std::string path_;
  UniqueFd listen_fd_;
  UniqueFd stop_r_, stop_w_;
  std::thread thread_;
  std::map<std::string, Handler> handlers_;
};

// Client side: sends one request, returns the reply's result JSON.
Result<std::string> ControlCall(const std::string& socket_path, const std::string& cmd,
                               const std::string& args_json = "{}");

}  // namespace qcowfs::daemon
