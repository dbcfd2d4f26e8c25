// `qcowfs status` and the control socket (SPEC §2, §7): the JSON fields, where the socket
// lives and its mode, --socket, and the protocol's handling of bad requests.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <random>
#include <string>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

// A raw client of the control socket, line by line, with a deadline on every read.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd_ >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    REQUIRE(path.size() < sizeof(addr.sun_path));
    std::memcpy(addr.sun_path, path.c_str(), path.size());
    REQUIRE_MESSAGE(::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0,
                    path << ": " << strerror(errno));
  }
  ~RawClient() { ::close(fd_); }
  void Send(const std::string& s) {
    size_t off = 0;
    while (off < s.size()) {
      ssize_t n = ::send(fd_, s.data() + off, s.size() - off, MSG_NOSIGNAL);
      REQUIRE_MESSAGE(n > 0, strerror(errno));
      off += static_cast<size_t>(n);
    }
  }
  // The next reply line, or "" after 10 s / on EOF.
  std::string ReadLine() {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      int left = static_cast<int>(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
      if (left <= 0) return "";
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, left) <= 0) return "";
      char chunk[4096];
      ssize_t n = ::read(fd_, chunk, sizeof(chunk));
      if (n <= 0) return "";
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }
  nlohmann::json Reply() {
    std::string line = ReadLine();
    INFO("reply line: '" << line << "'");
    REQUIRE_FALSE(line.empty());
    nlohmann::json j;
    REQUIRE_NOTHROW(j = nlohmann::json::parse(line));
    REQUIRE(j.is_object());
    REQUIRE(j.contains("ok"));
    return j;
  }

 private:
  int fd_ = -1;
  std::string buf_;
};

void CheckErrorReply(const nlohmann::json& j) {
  INFO(j.dump());
  CHECK(j.at("ok") == false);
  REQUIRE(j.contains("error"));
  CHECK(j.at("error").is_string());
  CHECK_FALSE(j.at("error").get<std::string>().empty());
}

std::string EscapedSocketName(const std::string& mp) {
  CmdResult r = Must({"systemd-escape", "--path", mp});
  std::string esc = r.out.substr(0, r.out.find('\n'));
  return esc + ".sock";
}

void CheckSocketFile(const std::string& path) {
  struct stat st;
  REQUIRE_MESSAGE(::stat(path.c_str(), &st) == 0, path << ": " << strerror(errno));
  CHECK(S_ISSOCK(st.st_mode));
  CHECK((st.st_mode & 07777) == 0600);
}

}  // namespace

TEST_CASE("mount status: text and --json report the mount and follow I/O") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint();
  QemuImgCreate(img, "64M");
  MountGuard g(mp, {"mount", img, mp, "--threads", "3"});
  REQUIRE_MOUNTED(g);

  auto j0 = g.StatusJson();
  INFO(j0.dump(2));
  // The pid is the daemon serving this mount: the qcowfs binary, still running.
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/" + std::to_string(g.pid()) + "/exe", ec);
  CHECK(exe.string() == RealPath(Bin()));
  REQUIRE(j0.at("images").is_array());
  REQUIRE(j0.at("images").size() == 1);
  const auto& i0 = j0.at("images")[0];
  CHECK(i0.at("virtual_size").get<uint64_t>() == 64 * MiB);
  const uint64_t alloc0 = i0.at("allocated_bytes").get<uint64_t>();
  CHECK(alloc0 < MiB);
  CHECK(i0.at("in_flight").get<uint64_t>() == 0);
  const auto& c0 = i0.at("cache");
  const uint64_t lookups0 = c0.at("l2_hits").get<uint64_t>() + c0.at("l2_misses").get<uint64_t>();

  {
    Fd f(mp, O_RDWR);
    REQUIRE(f.valid());
    std::mt19937_64 rng(1);
    std::vector<char> d = RandomBytes(rng, 3 * MiB);
    REQUIRE(PwriteAll(f.get(), d.data(), d.size(), MiB + 77));
    REQUIRE(::fsync(f.get()) == 0);
    std::vector<char> back(d.size());
    REQUIRE(PreadAll(f.get(), back.data(), back.size(), MiB + 77));
    CHECK(back == d);
  }
  auto j1 = g.StatusJson();
  INFO(j1.dump(2));
  const auto& i1 = j1.at("images")[0];
  const uint64_t alloc1 = i1.at("allocated_bytes").get<uint64_t>();
  CHECK(alloc1 >= alloc0 + 3 * MiB);
  CHECK(alloc1 <= alloc0 + 3 * MiB + 2 * 64 * KiB + MiB);
  CHECK(i1.at("virtual_size").get<uint64_t>() == 64 * MiB);
  CHECK(i1.at("in_flight").get<uint64_t>() == 0);
  const auto& c1 = i1.at("cache");
  CHECK(c1.at("l2_hits").get<uint64_t>() + c1.at("l2_misses").get<uint64_t>() > lookups0);
  CHECK(c1.at("l2_hits").get<uint64_t>() > 0);  // the read back hits the cached L2 table
  CHECK(j1.at("pid").get<pid_t>() == g.pid());

  // Growing the file shows in virtual_size.
  REQUIRE(::truncate(mp.c_str(), 80 * MiB) == 0);
  CHECK(g.StatusJson().at("images")[0].at("virtual_size").get<uint64_t>() == 80 * MiB);

  CmdResult text = g.Status(false);
  INFO(text.out << text.err);
  CHECK(text.exit_code == 0);
  CHECK(Contains(text.out, mp));
  CHECK(Contains(text.out, std::to_string(g.pid())));
  CHECK(Contains(text.out, img));
  CHECK_UNMOUNTS(g);
  CheckClean(img);

  // No daemon any more: status fails with one line.
  CmdResult gone = RunTimed({Bin(), "status", mp}, WithTimeout(15000));
  INFO(Describe({"status", mp}, gone));
  CHECK(gone.exit_code == 1);
  CHECK(CountLines(gone.err) == 1);
}

TEST_CASE("mount status: the default socket is $XDG_RUNTIME_DIR/qcowfs/ESCAPED.sock, mode 0600") {
  RequireMountTools();
  RequireTool("systemd-escape");
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint("my mount-point"), xdg = s.File("xdg");
  REQUIRE(::mkdir(xdg.c_str(), 0700) == 0);
  QemuImgCreate(img, "16M");
  RunOpts env;
  env.env["XDG_RUNTIME_DIR"] = xdg;
  {
    MountGuard g(mp, {"mount", img, mp}, "", env);
    REQUIRE_MOUNTED(g);
    std::string sock = xdg + "/qcowfs/" + EscapedSocketName(mp);
    CheckSocketFile(sock);
    CHECK(Must({Bin(), "status", "--socket", sock, "--json"}).out == Must({Bin(), "status", mp, "--json"}, env).out);
    CHECK_UNMOUNTS(g);
  }
  // Without XDG_RUNTIME_DIR: /run/qcowfs/ESCAPED.sock.
  RunOpts noenv;
  noenv.env["XDG_RUNTIME_DIR"] = std::nullopt;
  {
    MountGuard g(mp, {"mount", img, mp}, "", noenv);
    REQUIRE_MOUNTED(g);
    CheckSocketFile("/run/qcowfs/" + EscapedSocketName(mp));
    CHECK_UNMOUNTS(g);
  }
}

TEST_CASE("mount status: --socket PATH and -o socket=PATH") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint(), sock = s.File("ctl.sock");
  QemuImgCreate(img, "16M");
  for (bool via_o : {false, true}) {
    INFO(std::string(via_o ? "-o socket=" : "--socket "));
    std::vector<std::string> args = {"mount", img, mp};
    if (via_o) args.insert(args.end(), {"-o", "socket=" + sock});
    else args.insert(args.end(), {"--socket", sock});
    MountGuard g(mp, args, sock);
    REQUIRE_MOUNTED(g);
    CheckSocketFile(sock);
    CmdResult r = Must({Bin(), "status", "--json", "--socket", sock});
    auto j = nlohmann::json::parse(r.out);
    CHECK(j.at("images")[0].at("virtual_size").get<uint64_t>() == 16 * MiB);
    CHECK(j.at("pid").get<pid_t>() == g.pid());
    CHECK_UNMOUNTS(g);
  }
}

TEST_CASE("mount status: the control protocol answers bad requests with errors and carries on") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint(), sock = s.File("ctl.sock");
  QemuImgCreate(img, "16M");
  MountGuard g(mp, {"mount", img, mp, "--socket", sock}, sock);
  REQUIRE_MOUNTED(g);
  {
    RawClient c(sock);
    c.Send("not json\n");
    c.Send("{\"cmd\":\"status\"}\n");
    CheckErrorReply(c.Reply());
    auto ok = c.Reply();
    INFO(ok.dump());
    CHECK(ok.at("ok") == true);
    CHECK(ok.at("result").at("images")[0].at("virtual_size").get<uint64_t>() == 16 * MiB);
    // Both in one write, then the other bad shapes, each answered in order.
    c.Send("{\"cmd\": \"frobnicate\"}\n{\"cmd\":\"status\",\"args\":{}}\n");
    auto unknown = c.Reply();
    CheckErrorReply(unknown);
    CHECK(Contains(unknown.at("error").get<std::string>(), "frobnicate"));
    CHECK(c.Reply().at("ok") == true);
    for (const char* bad : {"[1,2,3]\n", "{\"args\":{}}\n", "{\"cmd\": 5}\n", "{\"cmd\":\"status\"\n", "\"status\"\n"}) {
      INFO("request: " << bad);
      c.Send(bad);
      CheckErrorReply(c.Reply());
    }
    // A request split across writes is one request.
    c.Send("{\"cmd\":");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    c.Send("\"status\"}\n");
    CHECK(c.Reply().at("ok") == true);
  }
  // A second connection and the CLI still work; so does the mount.
  {
    RawClient c(sock);
    c.Send("{\"cmd\":\"status\"}\n");
    CHECK(c.Reply().at("ok") == true);
  }
  CHECK(g.Status(true).exit_code == 0);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(::pwrite(f.get(), "ok", 2, 0) == 2);
  }
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}
