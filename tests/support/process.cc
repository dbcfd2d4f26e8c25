#include "support/process.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace qcowfs::testing {
namespace {

void DrainInto(int fd, std::string* out, bool* open) {
  char buf[8192];
  ssize_t n = read(fd, buf, sizeof(buf));
  if (n > 0) {
    out->append(buf, static_cast<size_t>(n));
  } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
    *open = false;
  }
}

}  // namespace

CmdResult RunCommand(const std::vector<std::string>& argv, const std::string& cwd) {
  CmdResult r{127, "", ""};
  if (argv.empty()) return r;
  // Everything the child needs is built before fork (only async-signal-safe calls after).
  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);

  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) < 0) {
    r.err = std::string("pipe: ") + strerror(errno);
    return r;
  }
  if (pipe2(err_pipe, O_CLOEXEC) < 0) {
    r.err = std::string("pipe: ") + strerror(errno);
    close(out_pipe[0]);
    close(out_pipe[1]);
    return r;
  }
  fflush(stdout);
  fflush(stderr);
  // posix_spawn, not fork: a test holding a large address space would otherwise
  // pay copy-on-write faults on every page after each command.
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_pipe[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, err_pipe[1], STDERR_FILENO);
  if (!cwd.empty()) posix_spawn_file_actions_addchdir_np(&fa, cwd.c_str());
  pid_t pid = -1;
  int rc = posix_spawnp(&pid, cargv[0], &fa, nullptr, cargv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    r.err = std::string("exec ") + argv[0] + ": " + strerror(rc);
    for (int fd : {out_pipe[0], out_pipe[1], err_pipe[0], err_pipe[1]}) close(fd);
    return r;
  }
  close(out_pipe[1]);
  close(err_pipe[1]);
  bool out_open = true, err_open = true;
  while (out_open || err_open) {
    struct pollfd fds[2];
    int nfds = 0;
    if (out_open) fds[nfds++] = {out_pipe[0], POLLIN, 0};
    if (err_open) fds[nfds++] = {err_pipe[0], POLLIN, 0};
    if (poll(fds, nfds, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < nfds; ++i) {
      if (fds[i].revents == 0) continue;
      if (fds[i].fd == out_pipe[0]) {
        DrainInto(out_pipe[0], &r.out, &out_open);
      } else {
        DrainInto(err_pipe[0], &r.err, &err_open);
      }
    }
  }
  close(out_pipe[0]);
  close(err_pipe[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      r.exit_code = 127;
      return r;
    }
  }
  if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.exit_code = 128 + WTERMSIG(status);
  }
  return r;
}

bool HaveTool(const char* name) {
  std::string n = name;
  if (n.find('/') != std::string::npos) return access(name, X_OK) == 0;
  const char* path = getenv("PATH");
  std::string p = path ? path : "/usr/local/bin:/usr/bin:/bin";
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find(':', start);
    if (end == std::string::npos) end = p.size();
    // (Not "if (dir.empty()) dir = ...": GCC 12 -Wrestrict false positive, PR105329.)
    std::string dir = end > start ? p.substr(start, end - start) : std::string(".");
    if (access((dir + "/" + n).c_str(), X_OK) == 0) return true;
    start = end + 1;
  }
  return false;
}

void SkipOrFail(const std::string& why) {
  const char* ci = getenv("CI");
  if (ci != nullptr && std::string(ci) == "true") {
    fprintf(stderr, "FAIL (CI=true, prerequisites must be present): %s\n", why.c_str());
    fflush(stderr);
    abort();
  }
  fprintf(stderr, "SKIP: %s\n", why.c_str());
  fflush(stderr);
  fflush(stdout);
  std::exit(77);
}

void RequireTool(const char* name) {
  if (!HaveTool(name)) SkipOrFail(std::string("required tool not found: ") + name);
}

std::string QcowfsBin() {
  const char* bin = getenv("QCOWFS_TEST_BIN");
  if (bin == nullptr || *bin == '\0') SkipOrFail("QCOWFS_TEST_BIN is not set (run via ctest)");
  return bin;
}

std::string Sha256File(const std::string& path) {
  CmdResult r = RunCommand({"sha256sum", "--", path});
  if (r.exit_code != 0 || r.out.size() < 64) return "";
  return r.out.substr(0, 64);
}

}  // namespace qcowfs::testing
