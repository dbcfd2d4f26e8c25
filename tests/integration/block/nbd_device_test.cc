// NbdDevice against real NBD servers: qemu-nbd serving a raw file (its content checked
// through the file), nbdkit's memory plugin with filters (block-size policy, no
// WRITE_ZEROES, injected errors, a paused server), and sockets that never speak NBD.
#include "block/nbd_device.h"

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

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "support/nbd_servers.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace qcowfs::block {
namespace {

using namespace std::chrono_literals;
using namespace qcowfs::testing;
using qcowfs::testing::TempDir;
using Clock = std::chrono::steady_clock;

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;

std::unique_ptr<NbdDevice> ConnectOrDie(const std::string& uri,
                                        std::chrono::milliseconds timeout = 10s) {
  auto r = NbdDevice::Connect(uri, timeout);
  REQUIRE_MESSAGE(r.ok(), r.status().ToString());
  return std::move(r).value();
}

// --- data helpers -----------------------------------------------------------------------------

std::vector<uint8_t> RandomBytes(size_t n, std::mt19937_64& rng) {
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void MakeFile(const std::string& path, uint64_t size, const std::vector<uint8_t>& head = {}) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  REQUIRE(fd >= 0);
  REQUIRE(ftruncate(fd, static_cast<off_t>(size)) == 0);
  if (!head.empty()) REQUIRE(pwrite(fd, head.data(), head.size(), 0) == static_cast<ssize_t>(head.size()));
  close(fd);
}

std::vector<uint8_t> FileBytes(const std::string& path, uint64_t off, size_t len) {
  std::vector<uint8_t> v(len);
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(pread(fd, v.data(), len, static_cast<off_t>(off)) == static_cast<ssize_t>(len));
  close(fd);
  return v;
}

// The file has allocated data at off (SEEK_DATA from off lands on off).
bool FileHasDataAt(const std::string& path, uint64_t off) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  off_t d = lseek(fd, static_cast<off_t>(off), SEEK_DATA);
  close(fd);
  return d == static_cast<off_t>(off);
}

std::vector<uint8_t> DevBytes(NbdDevice* dev, uint64_t off, size_t len) {
  std::vector<uint8_t> v(len, 0xee);
  Status st = dev->Read(off, v.data(), len);
  REQUIRE_MESSAGE(st.ok(), st.ToString());
  return v;
}

bool AllZero(const std::vector<uint8_t>& v) {
  for (uint8_t b : v) {
    if (b != 0) return false;
  }
  return true;
}

void MustOk(const Status& st) { REQUIRE_MESSAGE(st.ok(), st.ToString()); }

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// --- qemu-nbd ---------------------------------------------------------------------------------

TEST_CASE("NbdDevice: qemu-nbd round trip: read, write, zero, flush, block status, unaligned") {
  TempDir dir("qcowfs-nbd");
  std::mt19937_64 rng(1);
  std::string file = dir.File("disk.raw");
  std::vector<uint8_t> head = RandomBytes(1 * kMiB, rng);
  MakeFile(file, 8 * kMiB, head);
  auto server = StartQemuNbd(dir, file);
  std::string uri = UnixUri(dir.File("qemu-nbd.sock"));
  auto dev = ConnectOrDie(uri);

  CHECK(dev->Size() == 8 * kMiB);
  CHECK_FALSE(dev->read_only());
  CHECK(dev->AllocatedBytes() == dev->Size());
  CHECK(dev->can_zero());
  CHECK(dev->can_flush());
  CHECK(dev->can_block_status());
  MESSAGE("qemu-nbd: minimum block " << dev->min_block() << ", max I/O " << dev->max_io());

  CHECK(DevBytes(dev.get(), 0, head.size()) == head);

  // Write, flush, and the file has it.
  std::vector<uint8_t> data = RandomBytes(256 * kKiB, rng);
  MustOk(dev->Write(3 * kMiB, data.data(), data.size()));
  MustOk(dev->Flush());
  CHECK(FileBytes(file, 3 * kMiB, data.size()) == data);
  CHECK(DevBytes(dev.get(), 3 * kMiB, data.size()) == data);

  // Write-zeroes (keeping the allocation) in the middle of it.
  MustOk(dev->WriteZeroes(3 * kMiB + 64 * kKiB, 64 * kKiB, false));
  std::fill(data.begin() + 64 * kKiB, data.begin() + 128 * kKiB, 0);
  CHECK(DevBytes(dev.get(), 3 * kMiB, data.size()) == data);
  CHECK(FileBytes(file, 3 * kMiB, data.size()) == data);

  // Block status: written data, and a hole of the sparse file.
  auto bs = dev->GetBlockStatus(0, 8 * kMiB);
  REQUIRE_MESSAGE(bs.ok(), bs.status().ToString());
  CHECK(bs->type == ExtentType::kData);
  CHECK(bs->length >= 4 * kKiB);
  CHECK(bs->length <= 8 * kMiB);
  bs = dev->GetBlockStatus(6 * kMiB, 1 * kMiB);
  REQUIRE(bs.ok());
  CHECK(bs->type == ExtentType::kUnallocated);
  CHECK(bs->length == 1 * kMiB);  // clipped to the request
  CHECK_FALSE(dev->GetBlockStatus(8 * kMiB, 1).ok());

  // Unaligned writes: 1 byte and 511 bytes at odd offsets, one across a 4K boundary.
  std::vector<uint8_t> model = FileBytes(file, 0, 8 * kMiB);
  struct Piece {
    uint64_t off;
    size_t len;
  };
  for (Piece p : {Piece{1000001, 1}, Piece{4097 * 3, 511}, Piece{8191, 511}, Piece{5 * kMiB + 7, 70001}}) {
    std::vector<uint8_t> b = RandomBytes(p.len, rng);
    MustOk(dev->Write(p.off, b.data(), b.size()));
    std::copy(b.begin(), b.end(), model.begin() + static_cast<ptrdiff_t>(p.off));
  }
  MustOk(dev->Flush());
  CHECK(DevBytes(dev.get(), 0, 8 * kMiB) == model);
  CHECK(FileBytes(file, 0, 8 * kMiB) == model);
  // Unaligned reads see the same bytes.
  std::vector<uint8_t> odd = DevBytes(dev.get(), 8190, 515);
  CHECK(std::equal(odd.begin(), odd.end(), model.begin() + 8190));

  // The end of the export, resize, allocate.
  std::vector<uint8_t> buf(4096);
  Status st = dev->Read(8 * kMiB - 100, buf.data(), buf.size());
  CHECK(st.err() == EINVAL);
  CHECK(Contains(st.message(), uri));
  st = dev->Write(8 * kMiB - 100, buf.data(), buf.size());
  CHECK(st.err() == ENOSPC);
  CHECK(dev->WriteZeroes(8 * kMiB, 512, true).err() == ENOSPC);
  MustOk(dev->Discard(8 * kMiB - 512, 1 * kMiB));  // clipped at the end
  CHECK(AllZero(DevBytes(dev.get(), 8 * kMiB - 512, 512)));
  st = dev->Resize(16 * kMiB);
  CHECK(st.err() == ENOTSUP);
  CHECK(Contains(st.message(), "cannot resize an NBD export"));
  MustOk(dev->Resize(8 * kMiB));
  MustOk(dev->Allocate(0, 8 * kMiB));
  CHECK(dev->Size() == 8 * kMiB);
}

TEST_CASE("NbdDevice: zeros that may unmap read zeros, with and without qemu-nbd --discard=unmap") {
  for (bool unmap : {true, false}) {
    CAPTURE(unmap);
    TempDir dir("qcowfs-nbd");
    std::mt19937_64 rng(2);
    std::string file = dir.File("disk.raw");
    MakeFile(file, 4 * kMiB, RandomBytes(4 * kMiB, rng));
    auto server = StartQemuNbd(dir, file, unmap ? std::vector<std::string>{"--discard=unmap"}
                                                : std::vector<std::string>{});
    auto dev = ConnectOrDie(UnixUri(dir.File("qemu-nbd.sock")));

    MustOk(dev->WriteZeroes(1 * kMiB, 256 * kKiB, true));       // may unmap
    MustOk(dev->WriteZeroes(2 * kMiB, 256 * kKiB, false));      // NO_HOLE
    MustOk(dev->Discard(3 * kMiB, 256 * kKiB));                 // write-zeroes, never TRIM
    MustOk(dev->Flush());
    for (uint64_t off : {1 * kMiB, 2 * kMiB, 3 * kMiB}) {
      CAPTURE(off);
      CHECK(AllZero(DevBytes(dev.get(), off, 256 * kKiB)));
      CHECK(AllZero(FileBytes(file, off, 256 * kKiB)));
    }
    // NO_HOLE keeps the range allocated in the file.
    CHECK(FileHasDataAt(file, 2 * kMiB));
    if (unmap) {
      // WRITE_ZEROES without NO_HOLE punched holes; block status says so.
      CHECK_FALSE(FileHasDataAt(file, 1 * kMiB));
      CHECK_FALSE(FileHasDataAt(file, 3 * kMiB));
      auto bs = dev->GetBlockStatus(1 * kMiB, 256 * kKiB);
      REQUIRE(bs.ok());
      CHECK(bs->type == ExtentType::kUnallocated);
      CHECK(bs->length == 256 * kKiB);
    }
    // Data around the ranges is untouched.
    CHECK_FALSE(AllZero(DevBytes(dev.get(), 1 * kMiB - 4096, 4096)));
    CHECK_FALSE(AllZero(DevBytes(dev.get(), 1 * kMiB + 256 * kKiB, 4096)));
  }
}

TEST_CASE("NbdDevice: a read-only export is refused at connect") {
  TempDir dir("qcowfs-nbd");
  std::string file = dir.File("disk.raw");
  MakeFile(file, 1 * kMiB);
  auto server = StartQemuNbd(dir, file, {"-r"});
  std::string uri = UnixUri(dir.File("qemu-nbd.sock"));
  auto r = NbdDevice::Connect(uri, 10s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().err() == EROFS);
  CHECK(Contains(r.status().message(), uri));
  CHECK(Contains(r.status().message(), "read-only"));
}

TEST_CASE("NbdDevice: 4 threads on disjoint ranges against qemu-nbd") {
  TempDir dir("qcowfs-nbd");
  constexpr uint64_t kRange = 1 * kMiB;
  constexpr int kThreads = 4;
  std::string file = dir.File("disk.raw");
  MakeFile(file, kThreads * kRange);
  auto server = StartQemuNbd(dir, file);
  auto dev = ConnectOrDie(UnixUri(dir.File("qemu-nbd.sock")));

  std::vector<std::vector<uint8_t>> models(kThreads, std::vector<uint8_t>(kRange, 0));
  std::vector<std::string> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<uint8_t>& model = models[t];
      uint64_t base = t * kRange;
      for (int i = 0; i < 300 && failures[t].empty(); ++i) {
        uint64_t len = 1 + rng() % (64 * kKiB);
        uint64_t off = rng() % (kRange - len);
        int op = static_cast<int>(rng() % 10);
        Status st;
        if (op < 5) {
          std::vector<uint8_t> b = RandomBytes(len, rng);
          st = dev->Write(base + off, b.data(), len);
          std::copy(b.begin(), b.end(), model.begin() + static_cast<ptrdiff_t>(off));
        } else if (op < 7) {
          st = dev->WriteZeroes(base + off, len, op == 5);
          std::fill(model.begin() + static_cast<ptrdiff_t>(off),
                    model.begin() + static_cast<ptrdiff_t>(off + len), 0);
        } else {
          std::vector<uint8_t> b(len);
          st = dev->Read(base + off, b.data(), len);
          if (st.ok() && !std::equal(b.begin(), b.end(), model.begin() + static_cast<ptrdiff_t>(off)))
            failures[t] = "thread " + std::to_string(t) + ": read mismatch at op " + std::to_string(i);
        }
        if (!st.ok()) failures[t] = st.ToString();
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const std::string& f : failures) CHECK_MESSAGE(f.empty(), f);
  MustOk(dev->Flush());
  for (int t = 0; t < kThreads; ++t) {
    CAPTURE(t);
    CHECK(FileBytes(file, t * kRange, kRange) == models[t]);
    CHECK(DevBytes(dev.get(), t * kRange, kRange) == models[t]);
  }
}

TEST_CASE("NbdDevice: the server goes away: calls fail without waiting for the timeout") {
  TempDir dir("qcowfs-nbd");
  std::string file = dir.File("disk.raw");
  MakeFile(file, 1 * kMiB);
  auto server = StartQemuNbd(dir, file);
  std::string uri = UnixUri(dir.File("qemu-nbd.sock"));
  auto dev = ConnectOrDie(uri, 60s);
  std::vector<uint8_t> b(4096, 7);
  MustOk(dev->Write(0, b.data(), b.size()));
  server.reset();  // SIGTERM, waited for
  Status st = dev->Read(0, b.data(), b.size());
  MESSAGE("server gone: " << st.message());
  REQUIRE_FALSE(st.ok());
  CHECK(st.err() != ETIMEDOUT);  // noticed the lost connection, did not wait a minute
  CHECK(Contains(st.message(), uri));
  st = dev->Write(0, b.data(), b.size());
  MESSAGE("then: " << st.message());
  CHECK(st.err() == ENOTCONN);  // the device is broken: nothing is sent any more
  CHECK(Contains(st.message(), uri));
}

// --- nbdkit -----------------------------------------------------------------------------------

TEST_CASE("NbdDevice: nbdkit memory on 127.0.0.1 (nbd:// URI); zeros never sent as TRIM") {
  TempDir dir("qcowfs-nbd");
  RequireTool("nbdkit");
  int port = FreePort();
  // Every TRIM fails (EIO): a device that sent one for a zero or a discard would fail here.
  std::vector<std::string> argv = {"nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                   "-p", std::to_string(port), "--filter=error",
                                   "memory", "64M", "error-trim-rate=100%"};
  Server server(argv, dir.File("nbdkit.log"), [port] { return TcpConnects(port); });
  std::string uri = "nbd://127.0.0.1:" + std::to_string(port) + "/";
  auto dev = ConnectOrDie(uri);
  CHECK(dev->Size() == 64 * kMiB);
  CHECK(dev->can_zero());

  std::mt19937_64 rng(3);
  std::vector<uint8_t> data = RandomBytes(2 * kMiB + 3, rng);
  MustOk(dev->Write(5 * kMiB + 1, data.data(), data.size()));
  MustOk(dev->Flush());
  CHECK(DevBytes(dev.get(), 5 * kMiB + 1, data.size()) == data);
  auto bs = dev->GetBlockStatus(5 * kMiB + 1, data.size());
  REQUIRE(bs.ok());
  CHECK(bs->type == ExtentType::kData);
  bs = dev->GetBlockStatus(32 * kMiB, 1 * kMiB);
  REQUIRE(bs.ok());
  CHECK(bs->type == ExtentType::kUnallocated);

  MustOk(dev->Discard(5 * kMiB, 1 * kMiB));
  MustOk(dev->WriteZeroes(6 * kMiB, 512 * kKiB, true));
  MustOk(dev->WriteZeroes(6 * kMiB + 512 * kKiB, 512 * kKiB, false));
  CHECK(AllZero(DevBytes(dev.get(), 5 * kMiB, 2 * kMiB)));
  std::vector<uint8_t> tail = DevBytes(dev.get(), 7 * kMiB, 4);
  CHECK(std::equal(tail.begin(), tail.end(), data.begin() + (2 * kMiB - 1)));
  bs = dev->GetBlockStatus(5 * kMiB, 1 * kMiB);
  REQUIRE(bs.ok());
  CHECK(bs->type != ExtentType::kData);  // the discard left zeros (a hole, here)
}

// StartWriteback (the mirror's hint while it copies) posts an NBD FLUSH that nobody waits
// for: the server gets it, and the device goes on as before.
TEST_CASE("NbdDevice: StartWriteback posts a FLUSH without waiting for it") {
  TempDir dir("qcowfs-nbd");
  RequireTool("nbdkit");
  std::string sock = dir.File("nbdkit.sock"), log = dir.File("requests.log");
  auto server = StartNbdkitUnix(dir, sock, {"--filter=log", "memory", "16M", "logfile=" + log});
  auto dev = ConnectOrDie(UnixUri(sock));
  auto flushes = [&] {
    std::string text = ReadWholeFile(log);
    size_t n = 0;
    for (size_t at = text.find(" Flush "); at != std::string::npos; at = text.find(" Flush ", at + 1)) n++;
    return n;
  };
  std::vector<uint8_t> data(1 * kMiB, 0x6b);
  MustOk(dev->Write(0, data.data(), data.size()));
  CHECK(flushes() == 0);
  for (int i = 0; i < 3; i++) dev->StartWriteback();
  // A later command drives the connection: the posted FLUSHes go out with it and are
  // retired by libnbd when they complete, never waited for.
  MustOk(dev->Write(2 * kMiB, data.data(), data.size()));
  CHECK(DevBytes(dev.get(), 2 * kMiB, data.size()) == data);
  for (int i = 0; i < 100 && flushes() < 3; i++) {
    MustOk(dev->Write(4 * kMiB, data.data(), 4096));
    usleep(10000);
  }
  CHECK(flushes() >= 3);
  MustOk(dev->Flush());
  CHECK(DevBytes(dev.get(), 0, data.size()) == data);
}

TEST_CASE("NbdDevice: a server with a 512-byte minimum, 64K maximum and no WRITE_ZEROES") {
  TempDir dir("qcowfs-nbd");
  std::string sock = dir.File("nbdkit.sock");
  // The policy filter fails (EINVAL) every request not aligned to 512 or over 64K, so each
  // unaligned or large request below must be cut or read-modify-written; nozero hides
  // WRITE_ZEROES; the error filter fails every TRIM.
  auto server = StartNbdkitUnix(dir, sock,
                                {"--filter=blocksize-policy", "--filter=nozero", "--filter=error",
                                 "memory", "16M", "blocksize-minimum=512", "blocksize-maximum=64K",
                                 "blocksize-error-policy=error", "error-trim-rate=100%"});
  auto dev = ConnectOrDie(UnixUri(sock));
  CHECK(dev->min_block() == 512);
  CHECK(dev->max_io() == 64 * kKiB);
  CHECK_FALSE(dev->can_zero());

  std::mt19937_64 rng(4);
  std::vector<uint8_t> model = RandomBytes(16 * kMiB, rng);
  for (uint64_t off = 0; off < model.size(); off += 4 * kMiB)
    MustOk(dev->Write(off, model.data() + off, 4 * kMiB));
  struct Piece {
    uint64_t off;
    size_t len;
  };
  for (Piece p : {Piece{1001, 1}, Piece{3, 511}, Piece{511, 2}, Piece{4097, 511},
                  Piece{1 * kMiB + 7, 1 * kMiB + 3}, Piece{16 * kMiB - 1, 1}}) {
    CAPTURE(p.off);
    std::vector<uint8_t> b = RandomBytes(p.len, rng);
    MustOk(dev->Write(p.off, b.data(), b.size()));
    std::copy(b.begin(), b.end(), model.begin() + static_cast<ptrdiff_t>(p.off));
  }
  CHECK(DevBytes(dev.get(), 0, model.size()) == model);
  std::vector<uint8_t> odd = DevBytes(dev.get(), 509, 1027);
  CHECK(std::equal(odd.begin(), odd.end(), model.begin() + 509));

  // Zeroes and a discard on unaligned ranges: zero data, edges read-modify-written.
  for (Piece p : {Piece{1000, 5000}, Piece{2 * kMiB + 1, 3 * kMiB}, Piece{10 * kMiB + 100, 10}}) {
    CAPTURE(p.off);
    MustOk(dev->WriteZeroes(p.off, p.len, true));
    std::fill(model.begin() + static_cast<ptrdiff_t>(p.off),
              model.begin() + static_cast<ptrdiff_t>(p.off + p.len), 0);
  }
  MustOk(dev->Discard(12 * kMiB + 3, 100000));
  std::fill(model.begin() + static_cast<ptrdiff_t>(12 * kMiB + 3),
            model.begin() + static_cast<ptrdiff_t>(12 * kMiB + 3 + 100000), 0);
  MustOk(dev->Flush());
  CHECK(DevBytes(dev.get(), 0, model.size()) == model);

  // Block status of an unaligned offset: the partial block is data.
  auto bs = dev->GetBlockStatus(3, 10000);
  REQUIRE(bs.ok());
  CHECK(bs->type == ExtentType::kData);
  CHECK(bs->length == 509);
}

TEST_CASE("NbdDevice: concurrent read-modify-writes into shared 4K blocks lose nothing") {
  TempDir dir("qcowfs-nbd");
  std::string sock = dir.File("nbdkit.sock");
  auto server = StartNbdkitUnix(dir, sock,
                                {"--filter=blocksize-policy", "memory", "1M", "blocksize-minimum=4K",
                                 "blocksize-error-policy=error"});
  auto dev = ConnectOrDie(UnixUri(sock));
  REQUIRE(dev->min_block() == 4096);

  // Threads 0-3 write single bytes interleaved (byte i belongs to thread i % 4) across the
  // boundary of two 4K blocks; thread 4 rewrites a third block whole, concurrently.
  constexpr uint64_t kBase = 4096 - 1024;
  constexpr uint64_t kLen = 2048;
  std::vector<std::string> failures(5);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (uint64_t i = t; i < kLen; i += 4) {
        uint8_t b = static_cast<uint8_t>(i * 7 + 1);
        Status st = dev->Write(kBase + i, &b, 1);
        if (!st.ok()) {
          failures[t] = st.ToString();
          return;
        }
      }
    });
  }
  std::vector<uint8_t> whole(4096);
  threads.emplace_back([&] {
    for (int k = 0; k < 200; ++k) {
      std::fill(whole.begin(), whole.end(), static_cast<uint8_t>(k));
      Status st = dev->Write(3 * 4096, whole.data(), whole.size());
      if (!st.ok()) {
        failures[4] = st.ToString();
        return;
      }
    }
  });
  for (auto& th : threads) th.join();
  for (const std::string& f : failures) CHECK_MESSAGE(f.empty(), f);
  std::vector<uint8_t> got = DevBytes(dev.get(), kBase, kLen);
  for (uint64_t i = 0; i < kLen; ++i) {
    if (got[i] != static_cast<uint8_t>(i * 7 + 1)) {
      FAIL("byte " << i << " lost: " << int(got[i]));
    }
  }
  CHECK(DevBytes(dev.get(), 3 * 4096, 4096) == whole);
  CHECK(AllZero(DevBytes(dev.get(), 0, kBase)));
}

TEST_CASE("NbdDevice: server errors: EIO on writes names the URI, the device goes on") {
  TempDir dir("qcowfs-nbd");
  std::string sock = dir.File("nbdkit.sock");
  auto server = StartNbdkitUnix(dir, sock,
                                {"--filter=error", "memory", "1M", "error-pwrite-rate=100%"});
  std::string uri = UnixUri(sock);
  auto dev = ConnectOrDie(uri);
  std::vector<uint8_t> b(4096, 0x5a);
  Status st = dev->Write(0, b.data(), b.size());
  REQUIRE_FALSE(st.ok());
  CHECK(st.err() == EIO);
  CHECK(Contains(st.message(), uri));
  MESSAGE("write error: " << st.message());
  // A failed command does not break the connection.
  CHECK(AllZero(DevBytes(dev.get(), 0, 4096)));
  MustOk(dev->WriteZeroes(0, 4096, true));
  MustOk(dev->Flush());
}

TEST_CASE("NbdDevice: connect errors: closed port, missing socket, bad URI, no such export") {
  int port = FreePort();
  std::string uri = "nbd://127.0.0.1:" + std::to_string(port) + "/";
  auto r = NbdDevice::Connect(uri, 5s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().err() == ECONNREFUSED);
  CHECK(Contains(r.status().message(), uri));
  MESSAGE("closed port: " << r.status().message());

  TempDir dir("qcowfs-nbd");
  std::string missing = UnixUri(dir.File("nothing.sock"));
  r = NbdDevice::Connect(missing, 5s);
  REQUIRE_FALSE(r.ok());
  CHECK(r.status().err() == ENOENT);
  CHECK(Contains(r.status().message(), missing));
  MESSAGE("missing socket: " << r.status().message());

  r = NbdDevice::Connect("http://example.invalid/disk", 5s);
  REQUIRE_FALSE(r.ok());
  CHECK(Contains(r.status().message(), "http://example.invalid/disk"));
  MESSAGE("bad uri: " << r.status().message());

  std::string file = dir.File("disk.raw");
  MakeFile(file, 1 * kMiB);
  auto server = StartQemuNbd(dir, file, {"-x", "disk"});
  std::string wrong = "nbd+unix:///other?socket=" + dir.File("qemu-nbd.sock");
  r = NbdDevice::Connect(wrong, 5s);
  REQUIRE_FALSE(r.ok());
  CHECK(Contains(r.status().message(), wrong));
  MESSAGE("no such export: " << r.status().message());
  auto dev = ConnectOrDie("nbd+unix:///disk?socket=" + dir.File("qemu-nbd.sock"));
  CHECK(dev->Size() == 1 * kMiB);
}

// --- timeouts ---------------------------------------------------------------------------------

TEST_CASE("NbdDevice: connect to a socket that accepts and never speaks times out") {
  TempDir dir("qcowfs-nbd");
  std::string path = dir.File("silent.sock");
  int ufd = ListenUnix(path);
  int port = 0;
  int tfd = ListenTcp(&port);
  for (std::string uri : {UnixUri(path), "nbd://127.0.0.1:" + std::to_string(port) + "/"}) {
    CAPTURE(uri);
    Clock::time_point start = Clock::now();
    auto r = NbdDevice::Connect(uri, 500ms);
    MESSAGE("silent server: " << r.status().message() << " after "
            << std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count()
            << " ms");
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().err() == ETIMEDOUT);
    CHECK(Contains(r.status().message(), uri));
  }
  close(ufd);
  close(tfd);
}

TEST_CASE("NbdDevice: a paused server: the request times out, later calls fail at once; Abort") {
  TempDir dir("qcowfs-nbd");
  std::string sock = dir.File("nbdkit.sock");
  std::string ctl = dir.File("pause.ctl");
  auto server = StartNbdkitUnix(dir, sock, {"--filter=pause", "memory", "4M", "pause-control=" + ctl});
  std::string uri = UnixUri(sock);
  constexpr auto kTimeout = 1000ms;
  auto dev = ConnectOrDie(uri, kTimeout);
  auto other = ConnectOrDie(uri, 60s);  // for Abort: its own timeout never fires here
  std::vector<uint8_t> b(64 * kKiB, 0x11);
  MustOk(dev->Write(0, b.data(), b.size()));
  MustOk(other->Write(64 * kKiB, b.data(), b.size()));

  PauseControl(ctl, 'p');
  // A request against the paused server fails with ETIMEDOUT (it returns: the test would
  // hang otherwise) and breaks the device.
  Status st = dev->Read(0, b.data(), b.size());
  MESSAGE("paused server: " << st.message());
  CHECK(st.err() == ETIMEDOUT);
  CHECK(Contains(st.message(), uri));
  // Every later call fails at once, well before another timeout.
  Clock::time_point start = Clock::now();
  st = dev->Write(0, b.data(), b.size());
  CHECK(st.err() == ETIMEDOUT);
  CHECK(dev->Flush().err() == ETIMEDOUT);
  CHECK_FALSE(dev->GetBlockStatus(0, 4096).ok());
  CHECK(Clock::now() - start < kTimeout);

  // Abort wakes a caller that waits on a hung server (its own timeout is a minute).
  Status hung;
  std::thread waiter([&] {
    std::vector<uint8_t> rb(4096);
    hung = other->Read(0, rb.data(), rb.size());
  });
  std::this_thread::sleep_for(200ms);
  other->Abort();
  waiter.join();
  CHECK(hung.err() == ECANCELED);
  CHECK(Contains(hung.message(), uri));
  CHECK(other->Write(0, b.data(), 512).err() == ECANCELED);

  PauseControl(ctl, 'r');
  dev.reset();
  other.reset();
  // The server itself is fine: a new connection works.
  auto fresh = ConnectOrDie(uri, kTimeout);
  CHECK(DevBytes(fresh.get(), 64 * kKiB, 4096) == std::vector<uint8_t>(4096, 0x11));
}

TEST_CASE("NbdDevice: a slow server (delay filter) fails a write by its deadline, not later") {
  TempDir dir("qcowfs-nbd");
  std::string sock = dir.File("nbdkit.sock");
  auto server = StartNbdkitUnix(dir, sock, {"--filter=delay", "memory", "4M", "delay-write=30"});
  std::string uri = UnixUri(sock);
  auto dev = ConnectOrDie(uri, 500ms);
  std::vector<uint8_t> b(4096, 1);
  Clock::time_point start = Clock::now();
  Status st = dev->Write(0, b.data(), b.size());
  CHECK(st.err() == ETIMEDOUT);
  CHECK(Clock::now() - start < 30s);  // it did not wait for the server
  CHECK(dev->Read(0, b.data(), b.size()).err() == ETIMEDOUT);
}

}  // namespace
}  // namespace qcowfs::block
