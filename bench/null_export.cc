// qcowfs-null-export: qcowfs's FUSE server (the same request loop, device polling,
// handlers and reply path) over a device that does no I/O: reads return zeros,
// writes are dropped. bench/run.sh --ceiling runs the workloads on it to measure
// what the FUSE transport alone allows on this machine, the limit any image
// engine behind it stays under. A benchmark tool, not installed.
//
//   qcowfs-null-export SIZE MOUNTPOINT [--threads N] [--poll-us N] [--transport auto|legacy|ring] [--pidfile P]
//
// MOUNTPOINT is a regular file. Detaches once mounted; stop it with
// fusermount3 -u MOUNTPOINT.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "block/block_device.h"
#include "fuse/fuse_server.h"
#include "util/size.h"

namespace {

using qcowfs::Result;
using qcowfs::Status;
namespace block = qcowfs::block;

class NullDevice final : public block::BlockDevice {
 public:
  explicit NullDevice(uint64_t size) : size_(size) {}
  Status Read(uint64_t, void* buf, size_t len) override {
    std::memset(buf, 0, len);
    return Status::Ok();
  }
  Status Write(uint64_t, const void*, size_t) override { return Status::Ok(); }
  Status WriteZeroes(uint64_t, uint64_t, bool) override { return Status::Ok(); }
  Status Discard(uint64_t, uint64_t) override { return Status::Ok(); }
  Status Flush() override { return Status::Ok(); }
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    (void)offset;
    return block::BlockStatus{block::ExtentType::kZero, len};
  }
  uint64_t Size() const override { return size_; }
  Status Resize(uint64_t) override { return Status::Invalid("the null device has a fixed size"); }
  bool read_only() const override { return false; }
  uint64_t AllocatedBytes() const override { return 0; }

 private:
  uint64_t size_;
};

[[noreturn]] void Usage(const char* why) {
  std::fprintf(stderr, "qcowfs-null-export: %s\nusage: qcowfs-null-export SIZE MOUNTPOINT [--threads N] [--poll-us N] [--transport auto|legacy|ring] [--pidfile P]\n", why);
  std::exit(2);
}

unsigned long Number(const char* opt, const char* v) {
  char* end = nullptr;
  errno = 0;
  unsigned long n = std::strtoul(v, &end, 10);
  if (errno || !end || *end || v[0] == '-') Usage((std::string(opt) + " needs a number, not '" + v + "'").c_str());
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) Usage("SIZE and MOUNTPOINT are required");
  auto size = qcowfs::ParseSize(argv[1]);
  if (!size.ok() || size.value() == 0) Usage((std::string("bad SIZE '") + argv[1] + "'").c_str());
  char* mp = realpath(argv[2], nullptr);
  if (!mp) Usage((std::string(argv[2]) + ": mountpoint does not exist").c_str());
  qcowfs::fuse::ServerOptions so;
  so.mountpoint = mp;
  std::free(mp);
  std::string pidfile;
  for (int i = 3; i < argc; i++) {
    std::string a = argv[i];
    if (i + 1 >= argc) Usage((a + " needs a value").c_str());
    if (a == "--threads") {
      so.threads = static_cast<unsigned>(Number("--threads", argv[++i]));
    } else if (a == "--poll-us") {
      so.poll_us = static_cast<uint32_t>(Number("--poll-us", argv[++i]));
    } else if (a == "--transport") {
      if (!qcowfs::fuse::ParseTransport(argv[++i], &so.transport)) Usage("--transport must be auto, legacy or ring");
    } else if (a == "--pidfile") {
      pidfile = argv[++i];
    } else {
      Usage(("unknown option " + a).c_str());
    }
  }
  NullDevice dev(size.value());
  qcowfs::fuse::Export e;
  e.name = "null";
  e.image_path = so.mountpoint;
  e.image_fd = ::open(so.mountpoint.c_str(), O_PATH | O_CLOEXEC);  // owner and mode of the file
  e.dev = &dev;
  qcowfs::fuse::FuseServer server(so, {&e});
  if (Status s = server.Mount(); !s.ok()) {
    std::fprintf(stderr, "qcowfs-null-export: %s\n", s.message().c_str());
    return 1;
  }
  server.Daemonize();
  if (!pidfile.empty()) {
    FILE* f = std::fopen(pidfile.c_str(), "w");
    if (f) {
      std::fprintf(f, "%d\n", static_cast<int>(getpid()));
      std::fclose(f);
    }
  }
  Status s = server.Run();
  return s.ok() ? 0 : 1;
}
