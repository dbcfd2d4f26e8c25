// Targeted qcow2 format checks against qemu-img / qemu-io (SPEC §4): reads of images
// qemu wrote, writes into compressed clusters, internal snapshots, lazy-refcount dirty
// images, autoclear/incompatible feature bits, relative backing chains, L1 growth and
// QEMU-compatible image locking.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "block/block_device.h"
#include "qcow2/image.h"
#include "support/image_files.h"
#include "support/must.h"
#include "support/process.h"
#include "support/temp_dir.h"

namespace {

namespace fs = std::filesystem;
using qcowfs::block::ExtentType;
using qcowfs::qcow2::OpenOptions;
using qcowfs::qcow2::Qcow2Image;
using qcowfs::testing::CmdResult;
using qcowfs::testing::Join;
using qcowfs::testing::Must;
using qcowfs::testing::RunCommand;
using qcowfs::testing::TempDir;

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * 1024;

void RequireQemu() {
  qcowfs::testing::RequireTool("qemu-img");
  qcowfs::testing::RequireTool("qemu-io");
}

std::vector<uint8_t> ReadWholeFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteWholeFile(const std::string& path, const std::vector<uint8_t>& data) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  REQUIRE_MESSAGE(f.good(), "cannot write " << path);
}

int64_t FirstDiff(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return static_cast<int64_t>(std::min(a.size(), b.size()));
  if (memcmp(a.data(), b.data(), a.size()) == 0) return -1;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return -1;
}

#define CHECK_SAME(a, b, what)                                                     \
  do {                                                                             \
    int64_t _d = FirstDiff((a), (b));                                              \
    CHECK_MESSAGE(_d < 0, what << ": differs at offset " << _d << " (sizes "       \
                               << (a).size() << ", " << (b).size() << ")");        \
  } while (0)

// qemu's view of an image as raw bytes (snapshot: an internal snapshot's view).
std::vector<uint8_t> QemuRaw(const std::string& img, const std::string& snapshot = "") {
  std::string out = img + (snapshot.empty() ? ".qemu-view.raw" : ".qemu-snap.raw");
  std::vector<std::string> argv = {"qemu-img", "convert", "-U", "-f", "qcow2"};
  if (!snapshot.empty()) argv.insert(argv.end(), {"-l", "snapshot.name=" + snapshot});
  argv.insert(argv.end(), {"-O", "raw", img, out});
  Must(argv);
  std::vector<uint8_t> data = ReadWholeFile(out);
  std::remove(out.c_str());
  return data;
}

std::unique_ptr<Qcow2Image> OpenImage(const std::string& path, bool read_only = false) {
  OpenOptions o;
  o.read_only = read_only;
  auto r = Qcow2Image::Open(path, o);
  REQUIRE_MESSAGE(r.ok(), "open " << path << ": " << r.status().message());
  return std::move(r).value();
}

std::vector<uint8_t> ReadAll(Qcow2Image* img) {
  std::vector<uint8_t> buf(img->Size());
  for (uint64_t off = 0; off < buf.size(); off += 4 * MiB) {
    uint64_t n = std::min<uint64_t>(4 * MiB, buf.size() - off);
    qcowfs::Status s = img->Read(off, buf.data() + off, n);
    REQUIRE_MESSAGE(s.ok(), "read " << off << "+" << n << ": " << s.message());
  }
  return buf;
}

std::vector<uint8_t> ReadAllFrom(const std::string& path) {
  auto img = OpenImage(path, /*read_only=*/true);
  return ReadAll(img.get());
}

void WriteOk(Qcow2Image* img, uint64_t off, const std::vector<uint8_t>& data,
             std::vector<uint8_t>* model) {
  qcowfs::Status s = img->Write(off, data.data(), data.size());
  REQUIRE_MESSAGE(s.ok(), "write " << off << "+" << data.size() << ": " << s.message());
  if (model) std::copy(data.begin(), data.end(), model->begin() + static_cast<int64_t>(off));
}

void CloseOk(std::unique_ptr<Qcow2Image>& img) {
  qcowfs::Status s = img->Close();
  REQUIRE_MESSAGE(s.ok(), "close: " << s.message());
  img.reset();
}

std::vector<uint8_t> RandomBytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

void QemuIo(const std::string& fmt, const std::string& img, const std::vector<std::string>& cmds) {
  std::vector<std::string> argv = {"qemu-io", "-f", fmt};
  for (const auto& c : cmds) argv.insert(argv.end(), {"-c", c});
  argv.push_back(img);
  Must(argv);
}

// qemu-img check must report no errors and no leaks.
void CheckClean(const std::string& img) {
  CmdResult r = RunCommand({"qemu-img", "check", img});
  INFO("qemu-img check " << img << ": exit " << r.exit_code << "\n" << r.out << r.err);
  CHECK(r.exit_code == 0);
}

// Compares img (through qemu) with the expected contents.
void QemuCompare(const std::string& img, const std::vector<uint8_t>& expected) {
  std::string raw = img + ".expected.raw";
  WriteWholeFile(raw, expected);
  CmdResult r = RunCommand({"qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw});
  INFO("qemu-img compare " << img << ": exit " << r.exit_code << "\n" << r.out << r.err);
  CHECK(r.exit_code == 0);
  std::remove(raw.c_str());
}

// The text right after `"key":` (and spaces) in JSON output, or npos. No std::regex:
// GCC 12 warns (-Werror) about its internals in sanitizer builds.
std::size_t JsonValuePos(const std::string& json, const std::string& key) {
  std::size_t p = json.find("\"" + key + "\"");
  if (p == std::string::npos) return p;
  p = json.find(':', p);
  if (p == std::string::npos) return p;
  ++p;
  while (p < json.size() && json[p] == ' ') ++p;
  return p;
}

// A field of `qemu-img check --output=json` (or info): the integer after "key": .
int64_t JsonInt(const std::string& json, const std::string& key) {
  std::size_t p = JsonValuePos(json, key);
  REQUIRE_MESSAGE(p != std::string::npos, "no " << key << " in " << json);
  return std::stoll(json.substr(p));
}

bool JsonBool(const std::string& json, const std::string& key) {
  std::size_t p = JsonValuePos(json, key);
  REQUIRE_MESSAGE(p != std::string::npos, "no " << key << " in " << json);
  return json.compare(p, 4, "true") == 0;
}

// Header field access (big endian) on the image file.
uint64_t ReadBE64At(const std::string& path, uint64_t off) { return qcowfs::testing::FileBE64(path, off); }
void WriteBE64At(const std::string& path, uint64_t off, uint64_t v) { qcowfs::testing::SetFileBE64(path, off, v); }

constexpr uint64_t kIncompatOff = 72, kAutoclearOff = 88;

// A child process (qemu-io) with its stdout line-buffered into a pipe.
struct Child {
  pid_t pid = -1;
  int out = -1;
  std::string output;

  ~Child() { Kill(); }

  void Start(const std::vector<std::string>& argv) {
    std::vector<std::string> full = {"stdbuf", "-oL"};
    full.insert(full.end(), argv.begin(), argv.end());
    std::vector<char*> cargv;
    for (auto& a : full) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    int p[2];
    REQUIRE(pipe2(p, O_CLOEXEC) == 0);
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      int devnull = open("/dev/null", O_RDWR);
      dup2(devnull, 0);
      dup2(p[1], 1);
      dup2(p[1], 2);
      execvp(cargv[0], cargv.data());
      _exit(127);
    }
    close(p[1]);
    out = p[0];
    fcntl(out, F_SETFL, O_NONBLOCK);
  }

  // Waits until the output contains needle.
  bool WaitFor(const std::string& needle, int timeout_ms) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (output.find(needle) == std::string::npos) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      char buf[4096];
      ssize_t n = read(out, buf, sizeof(buf));
      if (n > 0) {
        output.append(buf, static_cast<size_t>(n));
      } else if (n == 0) {
        return output.find(needle) != std::string::npos;  // child gone
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    }
    return true;
  }

  void Kill() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      int st;
      waitpid(pid, &st, 0);
      pid = -1;
    }
    if (out >= 0) {
      close(out);
      out = -1;
    }
  }
};

// Per-sector "qemu says data" map from `qemu-img map --output=json`.
struct MapEntry {
  uint64_t start, length;
  bool data, zero, has_offset;
};

std::vector<MapEntry> QemuMap(const std::string& img) {
  CmdResult r = Must({"qemu-img", "map", "-U", "--output=json", img});
  std::vector<MapEntry> v;
  std::size_t pos = 0;
  while (pos < r.out.size()) {
    std::size_t nl = r.out.find('\n', pos);
    if (nl == std::string::npos) nl = r.out.size();
    std::string line = r.out.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.find("\"start\"") == std::string::npos) continue;
    MapEntry e;
    e.start = static_cast<uint64_t>(JsonInt(line, "start"));
    e.length = static_cast<uint64_t>(JsonInt(line, "length"));
    e.zero = JsonBool(line, "zero");
    e.data = JsonBool(line, "data");
    e.has_offset = line.find("\"offset\"") != std::string::npos;
    v.push_back(e);
  }
  REQUIRE(!v.empty());
  return v;
}

// ---- (a) reads of qemu-made images ------------------------------------------------

void ReadsMatchQemu(const std::string& opts, bool extl2) {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "8M"});
  std::vector<std::string> cmds = {
      "write -P 0x01 0 64k",
      "write -P 0x02 100k 3000",
      "write -P 0x03 " + std::to_string(200 * KiB + 17) + " 70000",
      "write -z 1M 192k",
      "write -P 0x04 2M 256k",
      "write -z -u 2M 64k",
      "write -z " + std::to_string(2 * MiB + 128 * KiB) + " 32k",
      "discard " + std::to_string(2 * MiB + 192 * KiB) + " 64k",
      "write -P 0x05 " + std::to_string(8 * MiB - 5000) + " 5000",
      "write -P 0x06 3M 1M",
      "discard " + std::to_string(3 * MiB + 256 * KiB) + " 256k",
      "write -P 0x07 " + std::to_string(3 * MiB + 300 * KiB) + " 512",
  };
  if (extl2) {
    // Single subclusters (2 KiB of a 64 KiB cluster): data, zero, discard.
    cmds.insert(cmds.end(), {
        "write -P 0x08 " + std::to_string(4 * MiB + 2 * KiB) + " 1k",
        "write -P 0x09 " + std::to_string(4 * MiB + 10 * KiB) + " 4k",
        "write -z " + std::to_string(4 * MiB + 12 * KiB) + " 2k",
        "write -P 0x0a " + std::to_string(5 * MiB) + " 64k",
        "discard " + std::to_string(5 * MiB + 16 * KiB) + " 8k",
        "write -z " + std::to_string(5 * MiB + 32 * KiB) + " 6k",
    });
  }
  QemuIo("qcow2", img, cmds);

  auto ours = ReadAllFrom(img);
  CHECK_SAME(ours, QemuRaw(img), "our read vs qemu-img convert");

  // Block status agrees with qemu-img map on data vs no-data, per 512-byte sector.
  auto image = OpenImage(img, true);
  const uint64_t size = image->Size();
  std::vector<char> q(size / 512, 0), o(size / 512, 0);
  for (const auto& e : QemuMap(img))
    for (uint64_t s = e.start / 512; s < (e.start + e.length) / 512; ++s) q[s] = e.data ? 1 : 0;
  for (uint64_t off = 0; off < size;) {
    auto r = image->GetBlockStatus(off, size - off);
    REQUIRE_MESSAGE(r.ok(), r.status().message());
    REQUIRE(r.value().length > 0);
    for (uint64_t s = off / 512; s < (off + r.value().length) / 512; ++s)
      o[s] = r.value().type == ExtentType::kData ? 1 : 0;
    off += r.value().length;
  }
  for (uint64_t s = 0; s < q.size(); ++s) {
    if (q[s] != o[s]) {
      FAIL_CHECK("block status differs from qemu-img map at " << s * 512 << ": qemu data="
                                                              << int(q[s]) << " ours data="
                                                              << int(o[s]));
      break;
    }
  }
}

// ---- (b) compressed clusters --------------------------------------------------------

void WriteIntoCompressed(const std::string& type) {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string src = dir.File("src.raw"), img = dir.File("img.qcow2");
  std::vector<uint8_t> content(4 * MiB);
  std::mt19937_64 rng(7);
  for (auto& b : content) b = static_cast<uint8_t>('a' + rng() % 4);  // compressible
  WriteWholeFile(src, content);
  Must({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
        "compression_type=" + type, src, img});
  CmdResult before = Must({"qemu-img", "check", "--output=json", img});
  const int64_t compressed0 = JsonInt(before.out, "compressed-clusters");
  const int64_t allocated0 = JsonInt(before.out, "allocated-clusters");
  REQUIRE(compressed0 == 64);

  CHECK_SAME(ReadAllFrom(img), content, "compressed image read");
  const uint64_t target = 3 * 64 * KiB;
  {
    auto image = OpenImage(img);
    WriteOk(image.get(), target + 1000, RandomBytes(512, 1), &content);
    // A second write straddling two compressed clusters.
    WriteOk(image.get(), 10 * 64 * KiB - 100, RandomBytes(300, 2), &content);
    std::vector<uint8_t> back(content.size());
    REQUIRE(image->Read(0, back.data(), back.size()).ok());
    CHECK_SAME(back, content, "read after write into compressed clusters");
    CloseOk(image);
  }
  CmdResult after = RunCommand({"qemu-img", "check", "--output=json", img});
  INFO(after.out << after.err);
  CHECK(after.exit_code == 0);
  CHECK(JsonInt(after.out, "compressed-clusters") == compressed0 - 3);
  CHECK(JsonInt(after.out, "allocated-clusters") == allocated0);
  // qemu-img map gives a host offset for normal clusters only.
  for (const auto& e : QemuMap(img)) {
    bool rewritten = (e.start <= target && target < e.start + e.length) ||
                     (e.start <= 9 * 64 * KiB && 9 * 64 * KiB < e.start + e.length) ||
                     (e.start <= 10 * 64 * KiB && 10 * 64 * KiB < e.start + e.length);
    if (rewritten) CHECK_MESSAGE(e.has_offset, "cluster at " << e.start << " still compressed");
  }
  auto qm = QemuMap(img);
  for (const auto& e : qm)
    if (e.start == 0) CHECK_MESSAGE(!e.has_offset, "cluster 0 should still be compressed");
  QemuCompare(img, content);
  CHECK_SAME(QemuRaw(img), content, "qemu view after write");
}

}  // namespace

TEST_CASE("format: reads match qemu, compat=0.10") { ReadsMatchQemu("compat=0.10", false); }
TEST_CASE("format: reads match qemu, compat=1.1") { ReadsMatchQemu("compat=1.1", false); }
TEST_CASE("format: reads match qemu, extended_l2") { ReadsMatchQemu("extended_l2=on", true); }
TEST_CASE("format: reads match qemu, extended_l2 16K clusters") {
  ReadsMatchQemu("extended_l2=on,cluster_size=16k", false);
}

TEST_CASE("format: write into a compressed cluster (zlib)") { WriteIntoCompressed("zlib"); }
TEST_CASE("format: write into a compressed cluster (zstd)") { WriteIntoCompressed("zstd"); }

TEST_CASE("format: internal snapshot survives writes") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "8M"});
  QemuIo("qcow2", img,
         {"write -P 0x31 0 2M", "write -P 0x32 5M 512k", "write -z 6M 64k",
          "write -P 0x33 7M 100k"});
  Must({"qemu-img", "snapshot", "-c", "s1", img});
  const std::vector<uint8_t> pre = QemuRaw(img);
  std::vector<uint8_t> model = pre;
  {
    auto image = OpenImage(img);
    WriteOk(image.get(), 0, RandomBytes(1 * MiB, 3), &model);             // whole clusters
    WriteOk(image.get(), 5 * MiB + 100, RandomBytes(70000, 4), &model);  // partial clusters
    WriteOk(image.get(), 7 * MiB + 4096, RandomBytes(512, 5), &model);
    REQUIRE(image->Discard(1536 * KiB, 128 * KiB).ok());
    std::fill(model.begin() + 1536 * KiB, model.begin() + 1664 * KiB, 0);
    REQUIRE(image->WriteZeroes(5 * MiB + 256 * KiB, 64 * KiB, true).ok());
    std::fill(model.begin() + 5 * MiB + 256 * KiB, model.begin() + 5 * MiB + 320 * KiB, 0);
    REQUIRE(image->WriteZeroes(7 * MiB, 64 * KiB, false).ok());
    std::fill(model.begin() + 7 * MiB, model.begin() + 7 * MiB + 64 * KiB, 0);
    CHECK_SAME(ReadAll(image.get()), model, "our read after writes");
    CloseOk(image);
  }
  CheckClean(img);
  CHECK_SAME(QemuRaw(img, "s1"), pre, "snapshot s1 after our writes");
  CHECK_SAME(QemuRaw(img), model, "active layer after our writes");
  Must({"qemu-img", "snapshot", "-a", "s1", img});
  CheckClean(img);
  CHECK_SAME(QemuRaw(img), pre, "after qemu-img snapshot -a s1");
  CHECK_SAME(ReadAllFrom(img), pre, "our read after snapshot -a s1");
}

namespace {

// Opens a dirty image writable: the engine rebuilds refcounts, or refuses with a
// message pointing at `qemu-img check -r all` (then we repair and open again).
std::unique_ptr<Qcow2Image> OpenDirty(const std::string& img) {
  auto r = Qcow2Image::Open(img, OpenOptions{});
  if (!r.ok()) {
    INFO("open of dirty image failed: " << r.status().message());
    CHECK(r.status().message().find("qemu-img check -r all") != std::string::npos);
    Must({"qemu-img", "check", "-r", "all", img});
    return OpenImage(img);
  }
  return std::move(r).value();
}

}  // namespace

TEST_CASE("format: lazy refcounts, image copied while open (engine crash)") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2"), copy = dir.File("copy.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k",
        img, "16M"});
  QemuIo("qcow2", img, {"write -P 0x41 0 256k"});
  std::vector<uint8_t> model = QemuRaw(img);
  std::vector<uint8_t> at_flush;
  {
    auto image = OpenImage(img);
    WriteOk(image.get(), 1 * MiB, RandomBytes(300 * KiB, 10), &model);
    WriteOk(image.get(), 9 * MiB + 3000, RandomBytes(10000, 11), &model);
    WriteOk(image.get(), 100 * KiB, RandomBytes(4096, 12), &model);  // overwrite in place
    REQUIRE(image->Discard(128 * KiB, 64 * KiB).ok());
    std::fill(model.begin() + 128 * KiB, model.begin() + 192 * KiB, 0);
    WriteOk(image.get(), 15 * MiB, RandomBytes(64 * KiB, 13), &model);
    REQUIRE(image->Flush().ok());
    at_flush = model;
    fs::copy_file(img, copy);  // the state a crash right now would leave
    WriteOk(image.get(), 4 * MiB, RandomBytes(64 * KiB, 14), &model);
    CloseOk(image);
  }
  CheckClean(img);
  QemuCompare(img, model);
  CHECK_MESSAGE(!JsonBool(Must({"qemu-img", "info", "--output=json", img}).out, "dirty-flag"),
                "closed image still dirty");

  CmdResult info = Must({"qemu-img", "info", "-U", "--output=json", copy});
  CHECK_MESSAGE(JsonBool(info.out, "dirty-flag"), "copy taken while open is not dirty: " << info.out);
  CHECK_MESSAGE((ReadBE64At(copy, kIncompatOff) & 1) == 1, "dirty bit not set in the header");
  // A read-only open of a dirty image works and reads the flushed data.
  {
    OpenOptions ro;
    ro.read_only = true;
    auto r = Qcow2Image::Open(copy, ro);
    CHECK_MESSAGE(r.ok(), "read-only open of a dirty image: " << r.status().message());
    if (r.ok()) CHECK_SAME(ReadAll(r.value().get()), at_flush, "read-only read of dirty copy");
  }
  {
    auto image = OpenDirty(copy);
    CHECK_SAME(ReadAll(image.get()), at_flush, "dirty copy after writable open");
    WriteOk(image.get(), 12 * MiB + 5, RandomBytes(9000, 15), &at_flush);
    CloseOk(image);
  }
  CheckClean(copy);
  QemuCompare(copy, at_flush);
  CHECK(!JsonBool(Must({"qemu-img", "info", "--output=json", copy}).out, "dirty-flag"));
}

TEST_CASE("format: lazy refcounts, qemu-io killed (qemu crash)") {
  RequireQemu();
  qcowfs::testing::RequireTool("stdbuf");
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "16M"});
  Child child;
  // Allocating writes, a flush (L2 tables on disk), a non-allocating write whose output
  // tells us the flush finished; then qemu-io is killed while it sleeps.
  child.Start({"qemu-io", "-f", "qcow2", "-c", "write -P 0x51 0 1M", "-c",
               "write -P 0x52 5M 192k", "-c", "flush", "-c", "write -P 0x53 64k 4k", "-c",
               "sleep 60000", img});
  REQUIRE_MESSAGE(child.WaitFor("at offset 65536", 20000), "qemu-io output: " << child.output);
  child.Kill();
  std::vector<uint8_t> expected(16 * MiB, 0);
  std::fill(expected.begin(), expected.begin() + 1 * MiB, 0x51);
  std::fill(expected.begin() + 5 * MiB, expected.begin() + 5 * MiB + 192 * KiB, 0x52);
  std::fill(expected.begin() + 64 * KiB, expected.begin() + 68 * KiB, 0x53);
  CmdResult info = Must({"qemu-img", "info", "--output=json", img});
  CHECK_MESSAGE(JsonBool(info.out, "dirty-flag"), info.out);
  {
    auto image = OpenDirty(img);
    CHECK_SAME(ReadAll(image.get()), expected, "killed qemu-io image");
    WriteOk(image.get(), 8 * MiB + 77, RandomBytes(100 * KiB, 20), &expected);
    CloseOk(image);
  }
  CheckClean(img);
  QemuCompare(img, expected);
  CHECK(!JsonBool(Must({"qemu-img", "info", "--output=json", img}).out, "dirty-flag"));
}

TEST_CASE("format: unknown autoclear bits are cleared on a writable open") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
  QemuIo("qcow2", img, {"write -P 0x61 0 128k"});
  const uint64_t unknown = (1ull << 10) | (1ull << 63);
  WriteBE64At(img, kAutoclearOff, ReadBE64At(img, kAutoclearOff) | unknown);
  {
    auto ro = OpenImage(img, true);  // read-only: nothing changes on disk
    ro.reset();
    CHECK((ReadBE64At(img, kAutoclearOff) & unknown) == unknown);
  }
  {
    auto image = OpenImage(img);
    CHECK((ReadBE64At(img, kAutoclearOff) & unknown) == 0);
    WriteOk(image.get(), 1 * MiB, RandomBytes(4096, 30), nullptr);
    CloseOk(image);
  }
  CHECK(ReadBE64At(img, kAutoclearOff) == 0);
  CheckClean(img);
}

TEST_CASE("format: persistent bitmap autoclear bit is cleared on a writable open") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
  Must({"qemu-img", "bitmap", "--add", img, "b0"});
  REQUIRE((ReadBE64At(img, kAutoclearOff) & 1) == 1);
  std::vector<uint8_t> model(4 * MiB, 0);
  {
    auto image = OpenImage(img);
    WriteOk(image.get(), 64 * KiB, RandomBytes(8192, 31), &model);
    CloseOk(image);
  }
  CHECK((ReadBE64At(img, kAutoclearOff) & 1) == 0);
  // The stale bitmap clusters may show up as leaks, never as errors.
  CmdResult r = RunCommand({"qemu-img", "check", img});
  INFO(r.out << r.err);
  CHECK((r.exit_code == 0 || r.exit_code == 3));
  QemuCompare(img, model);
}

namespace {

// Opens img in a forked child (so that an engine crash fails this check instead of
// killing the test binary) and expects the open to fail with a message containing needle.
void ExpectOpenFails(const std::string& img, bool read_only, const std::string& needle) {
  fflush(stdout);
  fflush(stderr);
  pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Plain crash reporting in the child (not doctest's handlers).
    for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE, SIGILL}) signal(sig, SIG_DFL);
    OpenOptions o;
    o.read_only = read_only;
    int code;
    {
      auto r = Qcow2Image::Open(img, o);
      if (r.ok()) {
        code = 10;
      } else {
        fprintf(stderr, "open (read_only=%d) failed as expected: %s\n", read_only,
                r.status().message().c_str());
        code = r.status().message().find(needle) != std::string::npos ? 0 : 11;
      }
    }
    _exit(code);
  }
  int st = 0;
  REQUIRE(waitpid(pid, &st, 0) == pid);
  INFO("open of " << img << " read_only=" << read_only);
  CHECK_MESSAGE(!WIFSIGNALED(st), "the open crashed with signal " << WTERMSIG(st));
  if (WIFEXITED(st)) {
    CHECK_MESSAGE(WEXITSTATUS(st) != 10, "the open succeeded");
    CHECK_MESSAGE(WEXITSTATUS(st) != 11, "the error message does not mention '" << needle << "'");
    CHECK_MESSAGE(WEXITSTATUS(st) == 0, "the child exited with " << WEXITSTATUS(st)
                                                                 << " (sanitizer report above?)");
  }
}

}  // namespace

TEST_CASE("format: unknown incompatible feature bit refuses to open") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
  WriteBE64At(img, kIncompatOff, ReadBE64At(img, kIncompatOff) | (1ull << 20));
  ExpectOpenFails(img, true, "20");
  ExpectOpenFails(img, false, "20");
}

TEST_CASE("format: corrupt bit: read-only open only") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
  QemuIo("qcow2", img, {"write -P 0x62 0 64k"});
  const std::vector<uint8_t> content = QemuRaw(img);
  WriteBE64At(img, kIncompatOff, ReadBE64At(img, kIncompatOff) | 2);
  ExpectOpenFails(img, false, "qemu-img check -r all");
  auto ro = OpenImage(img, true);
  CHECK(ro->corrupt());
  CHECK_SAME(ReadAll(ro.get()), content, "read-only read of a corrupt-marked image");
}

TEST_CASE("format: backing chain of depth 3 with relative paths, opened from another cwd") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  for (const char* d : {"a", "b", "c", "elsewhere"}) fs::create_directory(dir.File(d));
  const std::string base = dir.File("a/base.qcow2"), mid = dir.File("b/mid.qcow2"),
                    top = dir.File("c/top.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", base, "8M"});
  QemuIo("qcow2", base, {"write -P 0xb1 0 4M", "write -P 0xb2 6M 1M"});
  // mid is a different cluster size from base and top, and smaller than top.
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b",
        "../a/base.qcow2", "-F", "qcow2", mid, "8M"});
  QemuIo("qcow2", mid, {"write -P 0xc1 1M 512k", "write -z 3M 64k", "write -P 0xc2 7M 8k"});
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-b", "../b/mid.qcow2", "-F", "qcow2", top,
        "12M"});
  QemuIo("qcow2", top, {"write -P 0xd1 2M 64k", "write -P 0xd2 10M 64k"});
  const std::string base_sum = qcowfs::testing::Sha256File(base);
  const std::string mid_sum = qcowfs::testing::Sha256File(mid);
  REQUIRE(!base_sum.empty());

  std::vector<uint8_t> expected = QemuRaw(top);
  const fs::path old_cwd = fs::current_path();
  fs::current_path(dir.File("elsewhere"));
  struct Restore {
    fs::path p;
    ~Restore() { fs::current_path(p); }
  } restore{old_cwd};

  auto r = Qcow2Image::Open("../c/top.qcow2", OpenOptions{});
  REQUIRE_MESSAGE(r.ok(), r.status().message());
  auto image = std::move(r).value();
  // BackingChain() lists the backing files (mid, base), not the image itself.
  CHECK(image->BackingChain().size() == 2);
  CHECK_SAME(ReadAll(image.get()), expected, "chain read vs qemu");
  // Partial-cluster writes copy the rest of the cluster from the backing chain.
  WriteOk(image.get(), 100 * KiB + 3, RandomBytes(1000, 40), &expected);      // from base
  WriteOk(image.get(), 1 * MiB + 70 * KiB, RandomBytes(4096, 41), &expected);  // from mid
  WriteOk(image.get(), 3 * MiB + 512, RandomBytes(512, 42), &expected);       // mid zero
  WriteOk(image.get(), 7 * MiB + 1, RandomBytes(100, 43), &expected);          // mid+base
  WriteOk(image.get(), 9 * MiB - 10, RandomBytes(20, 44), &expected);          // past mid's end
  REQUIRE(image->WriteZeroes(6 * MiB + 64 * KiB, 64 * KiB, true).ok());
  std::fill(expected.begin() + 6 * MiB + 64 * KiB, expected.begin() + 6 * MiB + 128 * KiB, 0);
  REQUIRE(image->Discard(0, 64 * KiB).ok());
  std::fill(expected.begin(), expected.begin() + 64 * KiB, 0);
  CHECK_SAME(ReadAll(image.get()), expected, "chain read after writes");
  CloseOk(image);
  fs::current_path(old_cwd);

  CheckClean(top);
  QemuCompare(top, expected);
  CHECK(qcowfs::testing::Sha256File(base) == base_sum);
  CHECK(qcowfs::testing::Sha256File(mid) == mid_sum);
}

TEST_CASE("format: resize grows past the initial L1 table (512-byte clusters)") {
  RequireQemu();
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M"});
  QemuIo("qcow2", img, {"write -P 0x71 0 64k", "write -P 0x72 1000k 24k"});
  const uint64_t new_size = 256 * MiB;
  std::vector<uint8_t> model = QemuRaw(img);
  model.resize(new_size, 0);
  {
    auto image = OpenImage(img);
    REQUIRE(image->Resize(new_size).ok());
    CHECK(image->Size() == new_size);
    WriteOk(image.get(), new_size - 4096, RandomBytes(4096, 50), &model);
    WriteOk(image.get(), new_size - 1, RandomBytes(1, 51), &model);
    WriteOk(image.get(), 1 * MiB - 100, RandomBytes(1000, 52), &model);  // across old end
    WriteOk(image.get(), 128 * MiB + 333, RandomBytes(70000, 53), &model);
    CloseOk(image);
  }
  {
    auto image = OpenImage(img);
    CHECK(image->Size() == new_size);
    WriteOk(image.get(), 200 * MiB, RandomBytes(512, 54), &model);
    CHECK_SAME(ReadAll(image.get()), model, "read after resize + reopen");
    CloseOk(image);
  }
  CheckClean(img);
  CmdResult info = Must({"qemu-img", "info", "--output=json", img});
  CHECK(JsonInt(info.out, "virtual-size") == static_cast<int64_t>(new_size));
  QemuCompare(img, model);
}

TEST_CASE("format: image locking is compatible with qemu") {
  RequireQemu();
  qcowfs::testing::RequireTool("stdbuf");
  TempDir dir("qcowfs-format");
  const std::string img = dir.File("img.qcow2");
  Must({"qemu-img", "create", "-q", "-f", "qcow2", img, "4M"});
  {
    auto image = OpenImage(img);
    CmdResult info = RunCommand({"qemu-img", "info", img});
    CHECK(info.exit_code != 0);
    CHECK_MESSAGE(info.err.find("lock") != std::string::npos, info.err);
    CHECK(RunCommand({"qemu-img", "info", "-U", img}).exit_code == 0);
    CmdResult w = RunCommand({"qemu-io", "-c", "write 0 512", img});
    CHECK(w.exit_code != 0);
    CHECK_MESSAGE(w.err.find("lock") != std::string::npos, w.err);
    CloseOk(image);
  }
  {
    // A read-only open shares reading but still refuses qemu writers.
    auto image = OpenImage(img, true);
    CHECK(RunCommand({"qemu-img", "info", img}).exit_code == 0);
    CmdResult w = RunCommand({"qemu-io", "-c", "write 0 512", img});
    CHECK(w.exit_code != 0);
    image.reset();
  }
  CHECK(RunCommand({"qemu-img", "info", img}).exit_code == 0);

  Child child;
  child.Start({"qemu-io", "-f", "qcow2", "-c", "read 0 512", "-c", "sleep 60000", img});
  REQUIRE_MESSAGE(child.WaitFor("read 512/512", 20000), "qemu-io output: " << child.output);
  for (bool ro : {false, true}) {
    OpenOptions o;
    o.read_only = ro;
    auto r = Qcow2Image::Open(img, o);
    CHECK_MESSAGE(!r.ok(), "open (read_only=" << ro << ") succeeded while qemu-io holds the image");
    if (!r.ok()) {
      INFO("message: " << r.status().message());
      CHECK(r.status().message().find("lock") != std::string::npos);
    }
  }
  child.Kill();
  auto r = Qcow2Image::Open(img, OpenOptions{});
  CHECK_MESSAGE(r.ok(), "open after qemu-io exited: " << r.status().message());
}
