// fallocate and lseek SEEK_DATA/SEEK_HOLE through a real mount (SPEC §3), checked with
// qemu-img map/compare/check and the host file's own allocation.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <random>
#include <string>
#include <vector>

#include "mount_guard.h"

using namespace qcowfs::testing;
using namespace qcowfs::testing::mount;

namespace {

constexpr uint64_t C = 64 * KiB;  // default cluster size

// A qcow2 image and its raw shadow, filled with the same pattern byte over [0, fill).
struct Pair {
  std::string img, ref;
};

Pair MakePair(const Scratch& s, uint64_t size, uint64_t fill, char pattern, const std::string& opts = "") {
  Pair p{s.File("disk.qcow2"), s.File("ref.raw")};
  QemuImgCreate(p.img, std::to_string(size), opts);
  if (fill) {
    char cmd[64];
    snprintf(cmd, sizeof(cmd), "write -P 0x%02x 0 %llu", static_cast<unsigned char>(pattern),
             static_cast<unsigned long long>(fill));
    QemuIo(p.img, {cmd});
  }
  MakeRaw(p.ref, size);
  Fd r(p.ref, O_RDWR);
  std::vector<char> v(fill, pattern);
  REQUIRE(PwriteAll(r.get(), v.data(), v.size(), 0));
  return p;
}

void ZeroRef(const std::string& ref, uint64_t off, uint64_t len) {
  Fd r(ref, O_RDWR);
  std::vector<char> z(len, 0);
  REQUIRE(PwriteAll(r.get(), z.data(), len, off));
}

void Fallocate(int fd, int mode, uint64_t off, uint64_t len) {
  INFO("fallocate mode " << mode << " [" << off << ", +" << len << ")");
  int rc = ::fallocate(fd, mode, static_cast<off_t>(off), static_cast<off_t>(len));
  REQUIRE_MESSAGE(rc == 0, strerror(errno));
}

// The mounted file's bytes [off, off+len) equal the shadow's.
void CheckLikeRef(const std::string& mp, const std::string& ref, uint64_t off, uint64_t len) {
  std::vector<char> got = ReadRange(mp, off, len), want = ReadRange(ref, off, len);
  long long d = FirstDiff(got.data(), want.data(), len);
  INFO("[" << off << ", +" << len << ") first difference at +" << d);
  CHECK(d == -1);
}

uint64_t StatSize(const std::string& path) { return FileSize(path); }

off_t Seek(int fd, off_t off, int whence) {
  errno = 0;
  return ::lseek(fd, off, whence);
}

}  // namespace

TEST_CASE("mount fallocate: PUNCH_HOLE of whole clusters frees them in qcow2 and on the host") {
  RequireMountTools();
  Scratch s;
  Pair p = MakePair(s, 64 * MiB, 8 * MiB, static_cast<char>(0xaa));
  const uint64_t off = MiB, len = 2 * MiB;
  auto map0 = QemuMap(p.img);
  std::vector<uint64_t> host;  // host offsets of the clusters to punch
  for (uint64_t g = off; g < off + len; g += C) {
    auto h = HostOffset(map0, g);
    REQUIRE_MESSAGE(h, "no host offset for guest " << g << ": " << MapToString(map0));
    host.push_back(*h);
  }
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  REQUIRE(::fsync(f.get()) == 0);
  const uint64_t host_before = AllocatedBytesOf(p.img);
  Fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
  ZeroRef(p.ref, off, len);
  CHECK(StatSize(mp) == 64 * MiB);
  CheckLikeRef(mp, p.ref, off - C, len + 2 * C);
  REQUIRE(::fsync(f.get()) == 0);
  // The freed host range is given back: st_blocks drops and SEEK_HOLE finds holes there.
  uint64_t host_after = host_before;
  WaitFor([&] { return (host_after = AllocatedBytesOf(p.img)) + len <= host_before + C; }, 3000);
  INFO("host file allocated: before " << host_before << " after " << host_after);
  CHECK(host_after + len <= host_before + C);
  {
    Fd hf(p.img, O_RDONLY);
    for (uint64_t h : host) {
      off_t hole = Seek(hf.get(), static_cast<off_t>(h), SEEK_HOLE);
      INFO("host offset " << h);
      CHECK(hole == static_cast<off_t>(h));
    }
  }
  f.Close();
  CHECK_UNMOUNTS(g);
  auto map = QemuMap(p.img);
  INFO(MapToString(map));
  CHECK(MapHasNoData(map, off, len));
  CHECK(MapAllData(map, 0, off));
  CHECK(MapAllData(map, off + len, 8 * MiB - off - len));
  CheckClean(p.img);  // refcounts dropped: no leaks, no errors
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount fallocate: partial PUNCH_HOLE zeroes exactly the range") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2"), ref = s.File("ref.raw");
  QemuImgCreate(img, "16M");
  std::mt19937_64 rng(TestSeed(11));
  std::vector<char> data = RandomBytes(rng, 8 * MiB);
  MakeRaw(ref, 16 * MiB);
  {
    Fd r(ref, O_RDWR);
    REQUIRE(PwriteAll(r.get(), data.data(), data.size(), 0));
  }
  // Random (not pattern) data, so a punch that hits a neighbour byte shows up.
  Must({"qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", ref, img});
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  struct Range {
    uint64_t off, len;
  };
  const Range ranges[] = {
      {C + 100, 3000},                 // inside one cluster
      {3 * C + 8191, 2 * C + 5},       // partial, whole cluster 4, partial
      {5 * MiB + 7, 1},                // one byte
      {7 * MiB - 1, 2},                // across a cluster boundary
      {6 * MiB, C},                    // exactly one cluster
      {8 * MiB - 4096, 4096},          // last 4K of the data
  };
  for (const Range& r : ranges) {
    Fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, r.off, r.len);
    ZeroRef(ref, r.off, r.len);
  }
  for (const Range& r : ranges) {
    std::vector<char> got = ReadRange(mp, r.off, r.len);
    CHECK_MESSAGE(AllBytes(got, 0), "punched [" << r.off << ", +" << r.len << ") is not zero");
    CheckLikeRef(mp, ref, r.off - std::min<uint64_t>(r.off, C), r.len + 2 * C);  // neighbours intact
  }
  REQUIRE(::fsync(f.get()) == 0);
  f.Close();
  CHECK_UNMOUNTS(g);
  auto map = QemuMap(img);
  INFO(MapToString(map));
  CHECK(MapHasNoData(map, 4 * C, C));
  CHECK(MapHasNoData(map, 6 * MiB, C));
  CheckClean(img);
  CheckSameContent(img, ref);
}

TEST_CASE("mount fallocate: PUNCH_HOLE over a backing file reads zeros and leaves the base alone") {
  RequireMountTools();
  Scratch s;
  std::string base = s.File("base.qcow2"), top = s.File("top.qcow2"), ref = s.File("ref.raw");
  QemuImgCreate(base, "8M");
  QemuIo(base, {"write -P 0x55 0 8M"});
  QemuImgCreate(top, "8M", "", {"-b", "base.qcow2", "-F", "qcow2"});
  QemuIo(top, {"write -P 0x66 2M 1M"});
  MakeRaw(ref, 8 * MiB);
  {
    Fd r(ref, O_RDWR);
    std::vector<char> a(8 * MiB, 0x55), b(MiB, 0x66);
    REQUIRE(PwriteAll(r.get(), a.data(), a.size(), 0));
    REQUIRE(PwriteAll(r.get(), b.data(), b.size(), 2 * MiB));
  }
  const std::string base_sha = Sha256File(base);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", top, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  const uint64_t punches[][2] = {
      {MiB, MiB},               // whole clusters only in the base
      {2 * MiB + C, MiB - C},   // whole clusters allocated in the top
      {5 * MiB + 10, 5000},     // partial, base only
      {3 * MiB - 100, 200},     // partial, straddling top data / base data
  };
  for (const auto& pr : punches) {
    Fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, pr[0], pr[1]);
    ZeroRef(ref, pr[0], pr[1]);
  }
  CheckLikeRef(mp, ref, 0, 8 * MiB);
  REQUIRE(::fsync(f.get()) == 0);
  f.Close();
  CHECK_UNMOUNTS(g);
  CHECK(Sha256File(base) == base_sha);
  auto map = QemuMap(top);
  INFO(MapToString(map));
  CHECK(MapHasNoData(map, MiB, MiB));
  for (const auto& e : map)
    if (e.start < 2 * MiB && MiB < e.start + e.length) CHECK_MESSAGE(e.zero, "range over the base must read as zeros");
  CheckClean(top);
  CheckSameContent(top, ref);
}

TEST_CASE("mount fallocate: ZERO_RANGE with and without KEEP_SIZE") {
  RequireMountTools();
  Scratch s;
  Pair p = MakePair(s, 16 * MiB, 16 * MiB, static_cast<char>(0xbb));
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  Fallocate(f.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, MiB, MiB);  // whole clusters
  ZeroRef(p.ref, MiB, MiB);
  Fallocate(f.get(), FALLOC_FL_ZERO_RANGE, 3 * MiB + 100, 70000);  // inside the file, partial ends
  ZeroRef(p.ref, 3 * MiB + 100, 70000);
  // Past EOF with KEEP_SIZE: zeroes the in-file part, the size stays.
  Fallocate(f.get(), FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 16 * MiB - C, MiB);
  ZeroRef(p.ref, 16 * MiB - C, C);
  CHECK(StatSize(mp) == 16 * MiB);
  CheckLikeRef(mp, p.ref, 0, 16 * MiB);
  // Past EOF without KEEP_SIZE: grows like truncate.
  Fallocate(f.get(), FALLOC_FL_ZERO_RANGE, 17 * MiB, MiB);
  struct stat st;
  REQUIRE(::fstat(f.get(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_size) == 18 * MiB);
  REQUIRE(::truncate(p.ref.c_str(), 18 * MiB) == 0);
  CheckLikeRef(mp, p.ref, 15 * MiB, 3 * MiB);
  // The grown part is writable up to the new end.
  REQUIRE(::pwrite(f.get(), "end", 3, static_cast<off_t>(18 * MiB - 3)) == 3);
  {
    Fd r(p.ref, O_RDWR);
    REQUIRE(PwriteAll(r.get(), "end", 3, 18 * MiB - 3));
  }
  REQUIRE(::fsync(f.get()) == 0);
  f.Close();
  CHECK_UNMOUNTS(g);
  CHECK(VirtualSize(p.img) == 18 * MiB);
  auto map = QemuMap(p.img);
  INFO(MapToString(map));
  CHECK(MapHasNoData(map, MiB, MiB));  // zero clusters, no data written
  for (const auto& e : map)
    if (e.start < 2 * MiB && MiB < e.start + e.length) CHECK(e.zero);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount fallocate: mode 0 preallocates without changing data, grows past EOF") {
  RequireMountTools();
  Scratch s;
  Pair p = MakePair(s, 16 * MiB, 4 * MiB, static_cast<char>(0xcc));
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  REQUIRE(::fsync(f.get()) == 0);
  const uint64_t host_before = AllocatedBytesOf(p.img);
  Fallocate(f.get(), 0, MiB, 2 * MiB);  // over data
  Fallocate(f.get(), 0, 8 * MiB, MiB);  // over unallocated clusters
  CheckLikeRef(mp, p.ref, 0, 16 * MiB);
  REQUIRE(::fsync(f.get()) == 0);
  uint64_t host_after = AllocatedBytesOf(p.img);
  INFO("host file allocated before " << host_before << " after " << host_after);
  CHECK(host_after >= host_before + MiB);  // the unallocated MiB got host space
  Fallocate(f.get(), FALLOC_FL_KEEP_SIZE, 15 * MiB, 4 * MiB);
  CHECK(StatSize(mp) == 16 * MiB);
  Fallocate(f.get(), 0, 15 * MiB, 4 * MiB);
  CHECK(StatSize(mp) == 19 * MiB);
  REQUIRE(::truncate(p.ref.c_str(), 19 * MiB) == 0);
  CheckLikeRef(mp, p.ref, 0, 19 * MiB);
  REQUIRE(::fsync(f.get()) == 0);
  f.Close();
  CHECK_UNMOUNTS(g);
  CHECK(VirtualSize(p.img) == 19 * MiB);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount fallocate: COLLAPSE_RANGE, INSERT_RANGE and UNSHARE_RANGE fail with EOPNOTSUPP") {
  RequireMountTools();
  Scratch s;
  Pair p = MakePair(s, 16 * MiB, 4 * MiB, 0x12);
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  for (int mode : {FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_UNSHARE_RANGE}) {
    errno = 0;
    CHECK(::fallocate(f.get(), mode, static_cast<off_t>(MiB), static_cast<off_t>(MiB)) == -1);
    CHECK_MESSAGE(errno == EOPNOTSUPP, "mode " << mode << ": " << strerror(errno));
  }
  CHECK(StatSize(mp) == 16 * MiB);
  CheckLikeRef(mp, p.ref, 0, 16 * MiB);
  f.Close();
  CHECK_UNMOUNTS(g);
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount fallocate: --discard ignore zeroes on PUNCH_HOLE but frees nothing") {
  RequireMountTools();
  Scratch s;
  Pair p = MakePair(s, 16 * MiB, 8 * MiB, 0x3c);
  const uint64_t actual_before = QemuInfo(p.img).at("actual-size").get<uint64_t>();
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", p.img, mp, "--discard", "ignore"});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDWR);
  REQUIRE(f.valid());
  REQUIRE(::fsync(f.get()) == 0);
  const uint64_t host_before = AllocatedBytesOf(p.img);
  Fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, MiB, 2 * MiB);
  Fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * MiB + 3, 1000);
  ZeroRef(p.ref, MiB, 2 * MiB);
  ZeroRef(p.ref, 5 * MiB + 3, 1000);
  CheckLikeRef(mp, p.ref, 0, 16 * MiB);
  REQUIRE(::fsync(f.get()) == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // a late host punch would show now
  uint64_t host_after = AllocatedBytesOf(p.img);
  INFO("host file allocated before " << host_before << " after " << host_after);
  CHECK(host_after >= host_before);
  f.Close();
  CHECK_UNMOUNTS(g);
  CHECK(QemuInfo(p.img).at("actual-size").get<uint64_t>() >= actual_before);
  auto map = QemuMap(p.img);
  INFO(MapToString(map));
  for (const auto& e : map)
    if (e.start < 3 * MiB && MiB < e.start + e.length) CHECK_MESSAGE(e.zero, "punched range must read as zeros");
  CheckClean(p.img);
  CheckSameContent(p.img, p.ref);
}

TEST_CASE("mount lseek: SEEK_DATA/SEEK_HOLE follow the allocation map; zero clusters are holes") {
  RequireMountTools();
  Scratch s;
  std::string img = s.File("disk.qcow2");
  const uint64_t size = 16 * MiB;
  QemuImgCreate(img, "16M");
  QemuIo(img, {"write -P 1 " + std::to_string(2 * C) + " " + std::to_string(2 * C),  // clusters 2, 3
               "write -P 2 " + std::to_string(5 * C) + " " + std::to_string(C),      // cluster 5 ...
               "write -z " + std::to_string(5 * C) + " " + std::to_string(C),        // ... made zero (allocated)
               "write -z " + std::to_string(7 * C) + " " + std::to_string(C),        // zero flag, unallocated
               "write -P 3 " + std::to_string(10 * C) + " " + std::to_string(C),     // cluster 10
               "write -P 4 " + std::to_string(size - C) + " " + std::to_string(C)});  // last cluster
  // The oracle agrees with the layout we meant to build.
  auto map = QemuMap(img);
  INFO(MapToString(map));
  REQUIRE(MapAllData(map, 2 * C, 2 * C));
  REQUIRE(MapHasNoData(map, 4 * C, 6 * C));
  REQUIRE(MapAllData(map, 10 * C, C));
  REQUIRE(MapHasNoData(map, 11 * C, size - C - 11 * C));
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDONLY);
  REQUIRE(f.valid());
  const int fd = f.get();
  auto o = [](uint64_t v) { return static_cast<off_t>(v); };
  CHECK(Seek(fd, 0, SEEK_DATA) == o(2 * C));
  CHECK(Seek(fd, 0, SEEK_HOLE) == 0);
  CHECK(Seek(fd, o(2 * C + 5), SEEK_DATA) == o(2 * C + 5));
  CHECK(Seek(fd, o(2 * C), SEEK_HOLE) == o(4 * C));
  CHECK(Seek(fd, o(3 * C + 7), SEEK_HOLE) == o(4 * C));
  CHECK(Seek(fd, o(4 * C), SEEK_DATA) == o(10 * C));  // skips both zero clusters
  CHECK(Seek(fd, o(5 * C + 1), SEEK_HOLE) == o(5 * C + 1));
  CHECK(Seek(fd, o(10 * C), SEEK_HOLE) == o(11 * C));
  CHECK(Seek(fd, o(11 * C), SEEK_DATA) == o(size - C));
  CHECK(Seek(fd, o(size - C), SEEK_HOLE) == o(size));
  CHECK(Seek(fd, o(size - 1), SEEK_DATA) == o(size - 1));
  CHECK(Seek(fd, o(size), SEEK_DATA) == -1);
  CHECK(errno == ENXIO);
  CHECK(Seek(fd, o(size), SEEK_HOLE) == -1);
  CHECK(errno == ENXIO);
  // A write turns a hole into data, a punch turns it back.
  {
    Fd w(mp, O_RDWR);
    REQUIRE(w.valid());
    REQUIRE(::pwrite(w.get(), "x", 1, o(7 * C + 3)) == 1);
    CHECK(Seek(fd, o(4 * C), SEEK_DATA) == o(7 * C));
    CHECK(Seek(fd, o(7 * C), SEEK_HOLE) == o(8 * C));
    Fallocate(w.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10 * C, C);
    CHECK(Seek(fd, o(8 * C), SEEK_DATA) == o(size - C));
  }
  f.Close();
  CHECK_UNMOUNTS(g);
  CheckClean(img);
}

TEST_CASE("mount lseek: data in the backing file is data, a zero cluster over it is a hole") {
  RequireMountTools();
  Scratch s;
  std::string base = s.File("base.raw"), top = s.File("top.qcow2");
  MakeRaw(base, 16 * MiB);
  QemuIo(base, {"write -P 7 " + std::to_string(C) + " " + std::to_string(C),  // cluster 1
                "write -P 8 " + std::to_string(12 * C) + " " + std::to_string(2 * C)},  // clusters 12, 13
         "raw");
  QemuImgCreate(top, "16M", "", {"-b", base, "-F", "raw"});
  QemuIo(top, {"write -P 9 " + std::to_string(3 * C) + " " + std::to_string(C),  // cluster 3
               "write -z " + std::to_string(12 * C) + " " + std::to_string(C)});  // hides base cluster 12
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", "--read-only", top, mp});
  REQUIRE_MOUNTED(g);
  Fd f(mp, O_RDONLY);
  REQUIRE(f.valid());
  const int fd = f.get();
  auto o = [](uint64_t v) { return static_cast<off_t>(v); };
  CHECK(Seek(fd, 0, SEEK_DATA) == o(C));
  CHECK(Seek(fd, o(C), SEEK_HOLE) == o(2 * C));
  CHECK(Seek(fd, o(2 * C), SEEK_DATA) == o(3 * C));
  CHECK(Seek(fd, o(4 * C), SEEK_DATA) == o(13 * C));
  CHECK(Seek(fd, o(13 * C), SEEK_HOLE) == o(14 * C));
  f.Close();
  CHECK_UNMOUNTS(g);
}

TEST_CASE("mount lseek: cp --sparse=always copies the content and keeps it sparse") {
  RequireMountTools();
  RequireTool("cp");
  Scratch s;
  std::string base = s.File("base.qcow2"), img = s.File("disk.qcow2"), conv = s.File("conv.raw");
  const uint64_t size = 64 * MiB;
  QemuImgCreate(base, "64M");
  QemuIo(base, {"write -P 0x21 30M 256K", "write -P 0x22 60M 64K"});
  QemuImgCreate(img, "64M", "", {"-b", "base.qcow2", "-F", "qcow2"});
  QemuIo(img, {"write -P 0x31 3M 1M", "write -P 0x32 40M 64K", "write -P 0x33 65532K 4K",
               "write -z 60M 32K"});
  Must({"qemu-img", "convert", "-O", "raw", img, conv});
  std::string mp = s.FileMountpoint();
  MountGuard g(mp, {"mount", img, mp});
  REQUIRE_MOUNTED(g);
  std::string out = s.File("copy.raw");
  Must({"cp", "--sparse=always", mp, out});
  CHECK_UNMOUNTS(g);
  CHECK(FileSize(out) == size);
  CHECK(Sha256File(out) == Sha256File(conv));
  uint64_t alloc = AllocatedBytesOf(out);
  INFO("copy allocates " << alloc << " of " << size);
  CHECK(alloc < 4 * MiB);
  CheckClean(img);
}
