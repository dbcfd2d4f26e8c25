// Mount lifecycle and the command-line contract (SPEC §2, §3, §4 locking, §8): read-only
// mounts, truncate, O_TRUNC, directory mode and --config, clean shutdown on signals and in
// the foreground, QEMU-compatible locking both ways, and the errors for bad inputs.
#include <dirent.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

std::set<std::string> ListDir(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = opendir(dir.c_str());
  REQUIRE_MESSAGE(d != nullptr, dir << ": " << strerror(errno));
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.insert(n);
  }
  closedir(d);
  return names;
}

// PIDs of processes with path open (a daemon left behind by a failed mount shows here).
std::vector<pid_t> Holders(const std::string& path) {
  std::vector<pid_t> pids;
  std::error_code ec;
  for (const auto& p : std::filesystem::directory_iterator("/proc", ec)) {
    std::string name = p.path().filename();
    if (name.empty() || !std::all_of(name.begin(), name.end(), ::isdigit)) continue;
    std::error_code ec2;
    for (const auto& fd : std::filesystem::directory_iterator(p.path() / "fd", ec2)) {
      std::error_code ec3;
      if (std::filesystem::read_symlink(fd.path(), ec3).string() == path) {
        pids.push_back(std::stoi(name));
        break;
      }
    }
  }
  return pids;
}

// A process started by the test (not daemonized): killed with SIGKILL and reaped if it
// is still running when the guard goes.
class Child {
 public:
  Child(const std::vector<std::string>& argv_in, const std::string& log) {
    const std::vector<std::string> argv = WithTestTransport(WithTestCache(argv_in));
    std::vector<char*> cargv;
    for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    fflush(stdout);
    fflush(stderr);
    pid_ = fork();
    if (pid_ == 0) {
      int in = open("/dev/null", O_RDONLY);
      int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (in >= 0) dup2(in, 0);
      if (out >= 0) {
        dup2(out, 1);
        dup2(out, 2);
      }
      execvp(cargv[0], cargv.data());
      _exit(127);
    }
  }
  ~Child() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      Wait(5000);
    }
  }
  pid_t pid() const { return pid_; }
  // Exit status (128+signal if killed), or -1 if still running after timeout_ms.
  int Wait(int timeout_ms) {
    if (reaped_) return status_;
    ExitState s = WaitExit(pid_, timeout_ms);
    if (!s.exited) return -1;
    reaped_ = true;
    status_ = s.code;
    return status_;
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = -1;
};

// True if /proc/locks lists a lock on path's inode (QEMU takes OFD locks on the image).
bool HasFileLock(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return false;
  std::ifstream in("/proc/locks");
  std::string line;
  // Appended rather than `":" + std::to_string(...)`: GCC 12 at -O3 reports a false
  // -Wrestrict in that operator+.
  std::string suffix = ":";
  suffix += std::to_string(st.st_ino);
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string tok;
    while (ls >> tok) {
      if (std::count(tok.begin(), tok.end(), ':') == 2 && tok.size() > suffix.size() &&
          tok.compare(tok.size() - suffix.size(), suffix.size(), suffix) == 0)
        return true;
    }
  }
  return false;
}

// The decimal numbers in s, in order.
std::vector<uint64_t> Numbers(const std::string& s) {
  std::vector<uint64_t> out;
  for (size_t i = 0; i < s.size();) {
    if (!isdigit(static_cast<unsigned char>(s[i]))) {
      i++;
      continue;
    }
    size_t j = i;
    while (j < s.size() && isdigit(static_cast<unsigned char>(s[j]))) j++;
    out.push_back(std::stoull(s.substr(i, j - i)));
    i = j;
  }
  return out;
}

std::string FirstLine(const std::string& s) { return s.substr(0, s.find('\n')); }

// A `qcowfs mount ...` that must fail: the exit code, exactly one line on stderr that
// mentions each of `mentions` (case-insensitive), no mount left, no process holding the
// image, and the image unchanged.
void ExpectMountFails(const std::vector<std::string>& args, const std::set<int>& codes, const std::string& mp,
                      const std::string& img, const std::vector<std::string>& mentions) {
  const std::string sha = img.empty() ? "" : Sha256File(img);
  const std::vector<pid_t> holders_before = img.empty() ? std::vector<pid_t>{} : Holders(RealPath(img));
  std::vector<std::string> argv = {Bin()};
  argv.insert(argv.end(), args.begin(), args.end());
  CmdResult r = RunTimed(argv, WithTimeout(30000));
  INFO(Describe(argv, r));
  CHECK(codes.count(r.exit_code) == 1);
  CHECK(CountLines(r.err) == 1);
  CHECK(r.out.empty());
  for (const auto& m : mentions) CHECK_MESSAGE(Contains(Lower(r.err), Lower(m)), "stderr should mention '" << m << "'");
  CHECK_FALSE(Contains(r.err, "terminate called"));
  if (!mp.empty()) {
    bool mounted = IsMounted(mp);
    CHECK_FALSE(mounted);
    if (mounted) RunTimed({"fusermount3", "-u", "-z", RealPath(mp)}, WithTimeout(10000));
  }
  if (!img.empty()) {
    CHECK(Sha256File(img) == sha);
    std::vector<pid_t> holders;
    for (pid_t p : Holders(RealPath(img)))
      if (std::find(holders_before.begin(), holders_before.end(), p) == holders_before.end()) holders.push_back(p);
    CHECK_MESSAGE(holders.empty(), "a new process holds the image, first pid " << holders[0]);
  }
}

// The data qemu-io wrote in every lifecycle test, and its raw shadow.
void Seed(const std::string& img, const std::string& ref, uint64_t size) {
  QemuIo(img, {"write -P 0x91 1M 1M", "write -P 0x92 " + std::to_string(size - MiB) + " 1M"});
  MakeRaw(ref, size);
  Fd r(ref, O_RDWR);
  std::vector<char> a(MiB, static_cast<char>(0x91)), b(MiB, static_cast<char>(0x92));
  REQUIRE(PwriteAll(r.get(), a.data(), MiB, MiB));
  REQUIRE(PwriteAll(r.get(), b.data(), MiB, size - MiB));
}

void CheckReadsLike(const std::string& mp, const std::string& ref) {
  uint64_t size = FileSize(ref);
  REQUIRE(FileSize(mp) == size);
  std::vector<char> got = ReadRange(mp, 0, size), want = ReadRange(ref, 0, size);
  long long d = FirstDiff(got.data(), want.data(), size);
  CHECK_MESSAGE(d == -1, "differs from the model at " << d);
}

void WriteBoth(const std::string& mp, const std::string& ref, uint64_t off, const std::vector<char>& d) {
  Fd f(mp, O_RDWR);
  REQUIRE_MESSAGE(f.valid(), strerror(errno));
  REQUIRE_MESSAGE(PwriteAll(f.get(), d.data(), d.size(), off), strerror(errno));
  Fd r(ref, O_RDWR);
  REQUIRE(PwriteAll(r.get(), d.data(), d.size(), off));
}

int OpenErrno(const std::string& path, int flags) {
  errno = 0;
  int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (fd >= 0) {
    ::close(fd);
    return 0;
  }
  return errno;
}

int Errno(int rc) { return rc == 0 ? 0 : errno; }

}  // namespace

TEST_CASE("mount lifecycle: read-only mounts (--read-only and -o ro) refuse every change") {
  RequireMountTools();
  const std::vector<std::vector<std::string>> forms = {
      {"mount", "--read-only", "IMG", "MP"},
      {"IMG", "MP", "-o", "ro,threads=2"},
      {"mount", "IMG", "MP", "-o", "ro"},
  };
  for (const auto& form : forms) {
    INFO("form: " << Join(form));
    Scratch s;
    std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
    QemuImgCreate(img, "16M");
    Seed(img, ref, 16 * MiB);
    REQUIRE(::chmod(img.c_str(), 0664) == 0);
    const std::string sha = Sha256File(img);
    std::vector<std::string> args;
    for (const auto& a : form) args.push_back(a == "IMG" ? img : a == "MP" ? mp : a);
    {
      MountGuard g(mp, args);
      REQUIRE_MOUNTED(g);
      struct stat st;
      REQUIRE(::stat(mp.c_str(), &st) == 0);
      CHECK((st.st_mode & 07777) == 0444);
      CHECK(OpenErrno(mp, O_RDWR) == EROFS);
      CHECK(OpenErrno(mp, O_WRONLY) == EROFS);
      CHECK(OpenErrno(mp, O_WRONLY | O_TRUNC) == EROFS);
      CHECK(Errno(::truncate(mp.c_str(), 32 * MiB)) == EROFS);
      CHECK(Errno(::truncate(mp.c_str(), 8 * MiB)) == EROFS);
      Fd f(mp, O_RDONLY);
      REQUIRE(f.valid());
      // fallocate needs a writable descriptor, which a read-only mount never hands out.
      CHECK(::fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, MiB) == -1);
      CHECK(::pwrite(f.get(), "x", 1, 0) == -1);
      CheckReadsLike(mp, ref);
      // Another reader is welcome (QEMU shares reads); a writer is not.
      CmdResult info = RunTimed({"qemu-img", "info", img});
      CHECK_MESSAGE(info.exit_code == 0, info.err);
      CmdResult rw = RunTimed({"qemu-io", "-c", "write 0 512", img});
      CHECK(rw.exit_code != 0);
      f.Close();
      CHECK_UNMOUNTS(g);
    }
    CHECK(Sha256File(img) == sha);
    CheckClean(img);
  }
}

TEST_CASE("mount lifecycle: truncate grows the image, never shrinks it") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  CHECK(Errno(::truncate(mp.c_str(), 16 * MiB)) == 0);  // same size: nothing to do
  REQUIRE(Errno(::truncate(mp.c_str(), 32 * MiB)) == 0);
  CHECK(FileSize(mp) == 32 * MiB);
  REQUIRE(::truncate(ref.c_str(), 32 * MiB) == 0);
  std::vector<char> hello = {'h', 'e', 'l', 'l', 'o'};
  WriteBoth(mp, ref, 20 * MiB + 3, hello);
  {
    Fd f(mp, O_RDWR);
    REQUIRE(::ftruncate(f.get(), static_cast<off_t>(40 * MiB + 512)) == 0);
    CHECK(Errno(::ftruncate(f.get(), static_cast<off_t>(39 * MiB))) == EPERM);
    REQUIRE(::fsync(f.get()) == 0);
  }
  REQUIRE(::truncate(ref.c_str(), 40 * MiB + 512) == 0);
  WriteBoth(mp, ref, 40 * MiB + 500, std::vector<char>(12, 'z'));  // up to the new end
  CHECK(Errno(::truncate(mp.c_str(), 8 * MiB)) == EPERM);
  CHECK(Errno(::truncate(mp.c_str(), 0)) == EPERM);
  CHECK(FileSize(mp) == 40 * MiB + 512);
  CheckReadsLike(mp, ref);  // nothing lost by the refused shrinks
  CHECK_UNMOUNTS(g);
  CHECK(VirtualSize(img) == 40 * MiB + 512);
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount lifecycle: an O_TRUNC open (dd of=MOUNTPOINT) does not destroy data") {
  RequireMountTools();
  RequireTool("dd");
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  {
    Fd f(mp, O_WRONLY | O_TRUNC);
    CHECK_MESSAGE(f.valid(), "open(O_WRONLY|O_TRUNC): " << strerror(errno));
  }
  CHECK(FileSize(mp) == 16 * MiB);
  CheckReadsLike(mp, ref);
  // dd without conv=notrunc opens with O_TRUNC: it must work and leave the rest intact.
  std::string src = s.File("src.bin");
  std::mt19937_64 rng(3);
  std::vector<char> d = RandomBytes(rng, 128 * KiB);
  WriteFileText(src, std::string(d.begin(), d.end()));
  Must({"dd", "if=" + src, "of=" + mp, "bs=64K", "status=none"});
  {
    Fd r(ref, O_RDWR);
    REQUIRE(PwriteAll(r.get(), d.data(), d.size(), 0));
  }
  CHECK(FileSize(mp) == 16 * MiB);
  CheckReadsLike(mp, ref);
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount lifecycle: directory mode shows STEM.raw and its entries are fixed") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), dir = s.DirMountpoint();
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  MountGuard g(dir, {"mount", img, dir});
  REQUIRE_MOUNTED(g);
  CHECK(ListDir(dir) == std::set<std::string>{"disk.raw"});
  std::string file = dir + "/disk.raw";
  CheckReadsLike(file, ref);
  WriteBoth(file, ref, 5 * MiB - 7, std::vector<char>(100, 'q'));
  CHECK(OpenErrno(dir + "/new.raw", O_WRONLY | O_CREAT) == EPERM);
  CHECK(OpenErrno(dir + "/new.raw", O_WRONLY | O_CREAT | O_EXCL) == EPERM);
  CHECK(Errno(::mkdir((dir + "/sub").c_str(), 0755)) == EPERM);
  CHECK(Errno(::unlink(file.c_str())) == EPERM);
  CHECK(Errno(::rename(file.c_str(), (dir + "/other.raw").c_str())) == EPERM);
  CHECK(Errno(::symlink("disk.raw", (dir + "/link").c_str())) == EPERM);
  CHECK(Errno(::link(file.c_str(), (dir + "/hard").c_str())) == EPERM);
  CHECK(Errno(::mknod((dir + "/fifo").c_str(), S_IFIFO | 0644, 0)) == EPERM);
  struct stat st;
  CHECK(::stat((dir + "/missing.raw").c_str(), &st) == -1);
  CHECK(errno == ENOENT);
  CHECK(ListDir(dir) == std::set<std::string>{"disk.raw"});
  CheckReadsLike(file, ref);
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount lifecycle: two images from --config, with names, read_only and a socket") {
  RequireMountTools();
  Scratch s;
  std::string a = s.File("a.qcow2"), b = s.File("b.qcow2"), ref_a = s.File("ref-a.raw"), ref_b = s.File("ref-b.raw");
  std::string dir = s.DirMountpoint(), sock = s.File("ctl.sock"), cfg = s.File("vms.json");
  QemuImgCreate(a, "16M");
  QemuImgCreate(b, "8M");
  Seed(a, ref_a, 16 * MiB);
  Seed(b, ref_b, 8 * MiB);
  const std::string sha_b = Sha256File(b);
  nlohmann::json j = {
      {"mountpoint", dir},
      {"images",
       {{{"name", "alpha.raw"}, {"path", a}, {"discard", "unmap"}, {"cache_size", "4M"}},
        {{"name", "beta.img"}, {"path", b}, {"read_only", true}}}},
      {"threads", 2},
      {"allow_other", false},
      {"socket", sock},
  };
  WriteFileText(cfg, j.dump(2));
  {
    MountGuard g(dir, {"mount", "--config", cfg}, sock);
    REQUIRE_MOUNTED(g);
    CHECK(ListDir(dir) == std::set<std::string>{"alpha.raw", "beta.img"});
    CHECK(FileSize(dir + "/alpha.raw") == 16 * MiB);
    CHECK(FileSize(dir + "/beta.img") == 8 * MiB);
    CheckReadsLike(dir + "/alpha.raw", ref_a);
    CheckReadsLike(dir + "/beta.img", ref_b);
    CHECK(OpenErrno(dir + "/beta.img", O_RDWR) == EROFS);
    WriteBoth(dir + "/alpha.raw", ref_a, 7 * MiB + 1, std::vector<char>(70000, 'a'));
    auto st = g.StatusJson();
    REQUIRE(st.at("images").size() == 2);
    CHECK(st.at("images")[0].at("name") == "alpha.raw");
    CHECK(st.at("images")[1].at("name") == "beta.img");
    struct stat sst;
    REQUIRE(::stat(sock.c_str(), &sst) == 0);
    CHECK(S_ISSOCK(sst.st_mode));
    CHECK_UNMOUNTS(g);
  }
  CheckClean(a);
  CheckSameContent(a, ref_a);
  CHECK(Sha256File(b) == sha_b);
  // Command-line options override the file: --read-only makes alpha.raw read-only too.
  {
    const std::string sha_a = Sha256File(a);
    MountGuard g(dir, {"mount", "--config", cfg, "--read-only"}, sock);
    REQUIRE_MOUNTED(g);
    CHECK(OpenErrno(dir + "/alpha.raw", O_RDWR) == EROFS);
    CheckReadsLike(dir + "/alpha.raw", ref_a);
    CHECK_UNMOUNTS(g);
    CHECK(Sha256File(a) == sha_a);
  }
}

TEST_CASE("mount lifecycle: SIGTERM and SIGINT unmount cleanly, flushing unsynced writes") {
  RequireMountTools();
  for (int sig : {SIGTERM, SIGINT}) {
    INFO("signal " << strsignal(sig));
    Scratch s;
    std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
    QemuImgCreate(img, "16M", "lazy_refcounts=on");
    Seed(img, ref, 16 * MiB);
    MountGuard g(mp, {"mount", img, mp});
    REQUIRE_MOUNTED(g);
    std::mt19937_64 rng(sig);
    // Allocating writes, never fsync'ed: the clean shutdown must flush them.
    for (uint64_t off : {3 * MiB + 5, 9 * MiB - 100, 12 * MiB}) WriteBoth(mp, ref, off, RandomBytes(rng, 300 * KiB));
    std::string why = g.SignalAndWait(sig);
    INFO(why);
    CHECK(why.empty());
    CHECK(g.exit_code() == 0);
    CHECK_FALSE(IsMounted(mp));
    CheckClean(img);  // includes: dirty bit clear
    CheckSameContent(img, ref);
  }
}

TEST_CASE("mount lifecycle: -f stays in the foreground and exits 0 after fusermount3 -u") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  std::string log = s.File("fg.log");
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  Child c({Bin(), "mount", "-f", img, mp}, log);
  bool up = WaitFor([&] { return IsMounted(mp); }, 15000);
  INFO("log: " << ReadFileText(log));
  REQUIRE(up);
  auto m = FindFuseMount(RealPath(mp));
  REQUIRE(m);
  CHECK(c.Wait(0) == -1);  // still running: foreground
  // The control socket answers with the foreground process's own pid.
  CmdResult st = RunTimed({Bin(), "status", "--json", mp}, WithTimeout(15000));
  INFO(Describe({"status"}, st));
  REQUIRE(st.exit_code == 0);
  CHECK(nlohmann::json::parse(st.out).at("pid").get<pid_t>() == c.pid());
  WriteBoth(mp, ref, 4 * MiB + 1, std::vector<char>(200000, 'f'));
  CmdResult u = RunTimed({"fusermount3", "-u", mp}, WithTimeout(15000));
  CHECK_MESSAGE(u.exit_code == 0, u.err);
  int code = c.Wait(10000);
  if (code == -1) {  // hung: don't block the run
    AbortFuseConnection(m->minor);
    kill(c.pid(), SIGKILL);
    c.Wait(5000);
  }
  CHECK(code == 0);
  CHECK_FALSE(IsMounted(mp));
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount lifecycle: while mounted, QEMU and a second qcowfs cannot open the image") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  std::string mp2 = s.FileMountpoint("mp2");
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  CmdResult info = RunTimed({"qemu-img", "info", img});
  INFO(Describe({"qemu-img", "info", img}, info));
  CHECK(info.exit_code != 0);
  CHECK(Contains(Lower(info.err), "lock"));
  CmdResult shared = RunTimed({"qemu-img", "info", "-U", img});
  CHECK_MESSAGE(shared.exit_code == 0, shared.err);
  CmdResult io = RunTimed({"qemu-io", "-c", "write -P 0xee 0 4k", img});
  CHECK(io.exit_code != 0);
  // A second qcowfs on the same image: refused, nothing mounted.
  const std::string sha = Sha256File(img);
  std::vector<std::string> argv = {Bin(), "mount", img, mp2};
  CmdResult r = RunTimed(argv, WithTimeout(30000));
  INFO(Describe(argv, r));
  CHECK(r.exit_code == 1);
  CHECK(CountLines(r.err) == 1);
  CHECK(Contains(Lower(r.err), "lock"));
  CHECK_FALSE(IsMounted(mp2));
  CHECK(Sha256File(img) == sha);
  CheckReadsLike(mp, ref);  // the first mount is unharmed
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount lifecycle: an image qemu-io holds cannot be mounted") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw"), mp = s.FileMountpoint();
  QemuImgCreate(img, "16M");
  Seed(img, ref, 16 * MiB);
  for (bool reader : {false, true}) {
    INFO((std::string("qemu-io ") + (reader ? "-r (reader)" : "(writer)")));
    std::vector<std::string> argv = {"qemu-io"};
    if (reader) argv.push_back("-r");
    argv.insert(argv.end(), {"-c", "sleep 30000", img});
    Child q(argv, s.File("qemu-io.log"));
    // Wait until it holds the image: its OFD locks show in /proc/locks. (Probing with
    // another qemu-io would race with the child's own open.)
    bool held = WaitFor([&] { return HasFileLock(img); }, 10000);
    REQUIRE_MESSAGE(held, "qemu-io never took the lock: " << ReadFileText(s.File("qemu-io.log")));
    ExpectMountFails({"mount", img, mp}, {1}, mp, img, {"lock"});
    if (reader) {
      // Two readers share the image, as in QEMU.
      MountGuard g(mp, {"mount", "--read-only", img, mp});
      REQUIRE_MOUNTED(g);
      CheckReadsLike(mp, ref);
      CHECK_UNMOUNTS(g);
    }
    kill(q.pid(), SIGKILL);
    CHECK(q.Wait(5000) == 128 + SIGKILL);
  }
  // Once qemu-io is gone, the mount works.
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  CheckReadsLike(mp, ref);
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}

TEST_CASE("mount lifecycle: bad inputs give exit 1 or 2 and one line, and leave nothing behind") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), mp = s.FileMountpoint(), dir = s.DirMountpoint();
  QemuImgCreate(img, "16M");
  QemuIo(img, {"write -P 0x13 0 1M"});

  SUBCASE("missing image") {
    std::string missing = s.File("missing.qcow2");
    ExpectMountFails({"mount", missing, mp}, {1}, mp, "", {"missing.qcow2"});
  }
  SUBCASE("corrupt image: bad magic") {
    std::string bad = s.File("bad.qcow2");
    Must({"cp", img, bad});
    {
      Fd f(bad, O_RDWR);
      REQUIRE(::pwrite(f.get(), "XXXX", 4, 0) == 4);
    }
    ExpectMountFails({"mount", bad, mp}, {1}, mp, bad, {"bad.qcow2"});
  }
  SUBCASE("missing mountpoint") {
    ExpectMountFails({"mount", img, s.File("nodir/mp")}, {1}, "", img, {"nodir/mp"});
  }
  SUBCASE("unknown option") { ExpectMountFails({"mount", "--bogus-option", img, mp}, {2}, mp, img, {"bogus-option"}); }
  SUBCASE("unknown -o option") { ExpectMountFails({"mount", img, mp, "-o", "ro,frobnicate"}, {2}, mp, img, {"frobnicate"}); }
  SUBCASE("missing argument") { ExpectMountFails({"mount", img}, {2}, "", img, {}); }
  SUBCASE("missing option value") { ExpectMountFails({"mount", img, mp, "--threads"}, {2}, mp, img, {"threads"}); }
  SUBCASE("bad --threads") {
    ExpectMountFails({"mount", "--threads", "abc", img, mp}, {2}, mp, img, {"threads"});
    ExpectMountFails({"mount", "--threads", "0", img, mp}, {2}, mp, img, {"threads"});
  }
  SUBCASE("bad --poll-us, -o poll_us and config poll_us") {
    ExpectMountFails({"mount", "--poll-us", "20000", img, mp}, {2}, mp, img, {"poll-us"});
    ExpectMountFails({"mount", "--poll-us", "soon", img, mp}, {2}, mp, img, {"poll-us"});
    ExpectMountFails({"mount", img, mp, "-o", "poll_us=-1"}, {2}, mp, img, {"poll_us"});
    std::string cfg = s.File("poll.json");
    WriteFileText(cfg, nlohmann::json({{"mountpoint", dir}, {"poll_us", "fast"}, {"images", {{{"path", img}}}}}).dump());
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, dir, img, {"poll_us"});
  }
  SUBCASE("bad --discard and --cache-size") {
    ExpectMountFails({"mount", "--discard", "sometimes", img, mp}, {2}, mp, img, {"discard"});
    ExpectMountFails({"mount", "--cache-size", "12Q", img, mp}, {2}, mp, img, {"cache"});
  }
  SUBCASE("config: bad JSON names the line and column") {
    std::string cfg = s.File("bad.json");
    // The error is the second comma on line 3.
    const std::string line3 = "  \"images\": [ {\"path\": \"disk.qcow2\"} ,, ]";
    const size_t col = line3.find(",,") + 2;  // 1-based column of the second comma
    WriteFileText(cfg, "{\n  \"mountpoint\": \"" + dir + "\",\n" + line3 + "\n}\n");
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, dir, img, {"bad.json"});
    CmdResult r = RunTimed({Bin(), "mount", "--config", cfg});
    std::string msg = FirstLine(r.err);
    INFO(msg);
    // "line 3, column N" or "FILE:3:N": the numbers in the message (after the file
    // name) include 3 followed by the column, 1-based or 0-based.
    std::vector<uint64_t> nums = Numbers(msg.substr(msg.find("bad.json") + 8));
    bool found = false;
    for (size_t i = 0; i + 1 < nums.size(); i++)
      found |= nums[i] == 3 && (nums[i + 1] == col || nums[i + 1] == col - 1);
    CHECK_MESSAGE(found, "expected line 3 and column " << col);
  }
  SUBCASE("config: unknown key names its path") {
    std::string cfg = s.File("unknown.json");
    WriteFileText(cfg, nlohmann::json({{"mountpoint", dir}, {"images", {{{"path", img}, {"foo", 1}}}}}).dump());
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, dir, img, {"images[0].foo"});
  }
  SUBCASE("config: images[0].path missing") {
    std::string cfg = s.File("nopath.json");
    WriteFileText(cfg, nlohmann::json({{"mountpoint", dir}, {"images", {{{"name", "x.raw"}}}}}).dump());
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, dir, img, {"images[0].path"});
  }
  SUBCASE("config: wrong type names its path") {
    std::string cfg = s.File("type.json");
    WriteFileText(cfg, nlohmann::json({{"mountpoint", dir}, {"threads", "many"}, {"images", {{{"path", img}}}}}).dump());
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, dir, img, {"threads"});
  }
  SUBCASE("config: missing file") {
    ExpectMountFails({"mount", "--config", s.File("nothere.json")}, {1}, "", img, {"nothere.json"});
  }
  SUBCASE("a regular-file mountpoint with two images") {
    std::string cfg = s.File("two.json");
    std::string img2 = s.File("two.qcow2");
    QemuImgCreate(img2, "1M");
    WriteFileText(cfg, nlohmann::json({{"mountpoint", mp}, {"images", {{{"path", img}}, {{"path", img2}}}}}).dump());
    ExpectMountFails({"mount", "--config", cfg}, {1, 2}, mp, img, {"mp"});
  }
  // In every case the image still mounts afterwards (no stale lock, socket or mount).
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  CHECK(AllBytes(ReadRange(mp, 0, MiB), 0x13));
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}
