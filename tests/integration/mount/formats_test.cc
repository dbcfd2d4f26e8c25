// Mounting and writing the qcow2 variants qemu-img makes (SPEC §4): compressed clusters
// (zlib, zstd), internal snapshots, backing chains (qcow2 and raw), external data files,
// extended L2 entries and other geometries. The oracle: qemu-img check, compare, and
// convert -l for the snapshot.
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

// Random writes (1 byte to 2 MiB, unaligned, many across cluster and subcluster edges),
// partial and whole-cluster punches and zero ranges through the mount, mirrored into
// ref; then the whole file is read back through the mount and compared.
void Workload(const std::string& mp, const std::string& ref, uint64_t size, uint64_t cluster, uint64_t seed,
              int ops = 40) {
  INFO("workload seed " << seed << " cluster " << cluster);
  std::mt19937_64 rng(seed);
  Fd f(mp, O_RDWR);
  REQUIRE_MESSAGE(f.valid(), strerror(errno));
  Fd r(ref, O_RDWR);
  REQUIRE(r.valid());
  for (int i = 0; i < ops; i++) {
    int kind = static_cast<int>(rng() % 8);
    uint64_t len;
    switch (kind) {
      case 0:
        len = 1;
        break;
      case 1:
        len = 2 * MiB;
        break;
      case 2:
      case 3:
        len = 1 + rng() % (3 * cluster);
        break;
      default:
        len = 1 + rng() % (96 * KiB);
        break;
    }
    len = std::min(len, size / 2);
    uint64_t off = rng() % (size - len);
    if (rng() % 3 == 0) off = std::max<uint64_t>(cluster, off - off % cluster) - 1 - rng() % 3;  // near an edge
    if (off + len > size) len = size - off;
    INFO("op " << i << " [" << off << ", +" << len << ")");
    if (kind == 6 || kind == 7) {
      int mode = kind == 6 ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
      if (rng() % 2) {  // whole clusters
        off -= off % cluster;
        len = std::max(cluster, len - len % cluster);
        if (off + len > size) off = size - len;
      }
      int rc = ::fallocate(f.get(), mode, static_cast<off_t>(off), static_cast<off_t>(len));
      REQUIRE_MESSAGE(rc == 0, "fallocate " << mode << ": " << strerror(errno));
      std::vector<char> z(len, 0);
      REQUIRE(PwriteAll(r.get(), z.data(), len, off));
    } else {
      std::vector<char> d = RandomBytes(rng, len);
      REQUIRE_MESSAGE(PwriteAll(f.get(), d.data(), len, off), strerror(errno));
      REQUIRE(PwriteAll(r.get(), d.data(), len, off));
    }
  }
  REQUIRE(::fsync(f.get()) == 0);
  for (uint64_t off = 0; off < size; off += 4 * MiB) {
    uint64_t n = std::min<uint64_t>(4 * MiB, size - off);
    std::vector<char> got = ReadRange(mp, off, n), want = ReadRange(ref, off, n);
    long long d = FirstDiff(got.data(), want.data(), n);
    CHECK_MESSAGE(d == -1, "mounted file differs from the model at " << off + d);
  }
}

// Mounts img, checks it reads like `expect` (raw), runs the workload against a copy of it,
// unmounts, and checks with qemu-img.
void MountWriteCheck(const Scratch& s, const std::string& img, const std::string& expect, uint64_t size,
                     uint64_t cluster, uint64_t seed, RunOpts opts = {}) {
  std::string ref = s.File("ref.raw"), mp = s.FileMountpoint("mp-" + std::to_string(seed));
  Must({"cp", "--sparse=always", expect, ref});
  MountGuard g(mp, {"mount", img, mp}, "", opts);
  REQUIRE_MOUNTED(g);
  CHECK_MESSAGE(Sha256File(mp) == Sha256File(expect), "the mounted image does not read like qemu-img convert");
  Workload(mp, ref, size, cluster, seed);
  CHECK_UNMOUNTS(g);
  CheckClean(img);
  CheckSameContent(img, ref);
}

// A raw file of `size` with compressible text in most clusters, random bytes in some, and
// zeros in others.
void MakeMixedRaw(const std::string& path, uint64_t size, uint64_t cluster, uint64_t seed) {
  std::mt19937_64 rng(seed);
  MakeRaw(path, size);
  Fd f(path, O_RDWR);
  for (uint64_t c = 0; c * cluster < size * 3 / 4; c++) {
    std::vector<char> buf;
    switch (c % 4) {
      case 0:
      case 1: {
        std::string line = "cluster " + std::to_string(c) + " compresses well; ";
        while (buf.size() < cluster) buf.insert(buf.end(), line.begin(), line.end());
        buf.resize(cluster);
        break;
      }
      case 2:
        buf = RandomBytes(rng, cluster);
        break;
      default:
        continue;
    }
    REQUIRE(PwriteAll(f.get(), buf.data(), cluster, c * cluster));
  }
}

}  // namespace

TEST_CASE("mount formats: zlib- and zstd-compressed images read right and take writes") {
  RequireMountTools();
  for (const char* type : {"zlib", "zstd"}) {
    INFO("compression_type=" << type);
    Scratch s;
    const uint64_t size = 16 * MiB, cluster = 64 * KiB;
    std::string src = s.File("src.raw"), img = s.File("disk.qcow2");
    MakeMixedRaw(src, size, cluster, 21);
    Must({"qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", std::string("compression_type=") + type, src,
          img});
    auto info = QemuInfo(img);
    REQUIRE(info.at("format-specific").at("data").at("compression-type").get<std::string>() == type);
    REQUIRE(info.at("actual-size").get<uint64_t>() < size / 2);  // really compressed
    MountWriteCheck(s, img, src, size, cluster, 100 + (type[1] == 's'));
  }
}

TEST_CASE("mount formats: an internal snapshot survives writes, punches and zeroing intact") {
  RequireMountTools();
  Scratch s;
  const uint64_t size = 16 * MiB, cluster = 64 * KiB;
  std::string img = s.File("disk.qcow2"), snap_expect = s.File("snap-expect.raw"), snap = s.File("snap.raw");
  MakeMixedRaw(snap_expect, size, cluster, 31);
  QemuImgCreate(img, "16M");
  Must({"qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", snap_expect, img});
  Must({"qemu-img", "snapshot", "-c", "snap1", img});
  MountWriteCheck(s, img, snap_expect, size, cluster, 300);
  CHECK(Contains(Must({"qemu-img", "snapshot", "-l", img}).out, "snap1"));
  Must({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=snap1", img, snap});
  CHECK_MESSAGE(Sha256File(snap) == Sha256File(snap_expect), "snapshot content changed");
}

TEST_CASE("mount formats: a backing chain (qcow2 over raw) reads through and is never written") {
  RequireMountTools();
  Scratch s;
  const uint64_t size = 16 * MiB, cluster = 64 * KiB;
  std::string base = s.File("base.raw"), mid = s.File("mid.qcow2"), top = s.File("top.qcow2");
  std::string expect = s.File("expect.raw");
  MakeRaw(base, size);
  QemuIo(base, {"write -P 0x41 0 6M", "write -P 0x44 15M 1M"}, "raw");
  QemuImgCreate(mid, "16M", "", {"-b", "base.raw", "-F", "raw"});
  QemuIo(mid, {"write -P 0x42 2M 2M", "write -z 5M 64K"});
  QemuImgCreate(top, "16M", "", {"-b", "mid.qcow2", "-F", "qcow2"});
  QemuIo(top, {"write -P 0x43 3M 64K", "write -P 0x45 4194000 1000"});
  Must({"qemu-img", "convert", "-O", "raw", top, expect});
  const std::string base_sha = Sha256File(base), mid_sha = Sha256File(mid);
  // From another working directory: relative backing names resolve against the image.
  RunOpts opts;
  opts.cwd = "/";
  MountWriteCheck(s, top, expect, size, cluster, 400, opts);
  CHECK(Sha256File(base) == base_sha);
  CHECK(Sha256File(mid) == mid_sha);
  CheckClean(mid);
}

TEST_CASE("mount formats: a compat=0.10 image over a backing file (no zero flag) reads zeros where zeroed") {
  RequireMountTools();
  Scratch s;
  const uint64_t size = 16 * MiB, cluster = 64 * KiB;
  std::string base = s.File("base.qcow2"), top = s.File("top.qcow2"), expect = s.File("expect.raw");
  QemuImgCreate(base, "16M", "compat=0.10");
  QemuIo(base, {"write -P 0x71 0 16M"});
  QemuImgCreate(top, "16M", "compat=0.10", {"-b", "base.qcow2", "-F", "qcow2"});
  Must({"qemu-img", "convert", "-O", "raw", top, expect});
  MountWriteCheck(s, top, expect, size, cluster, 500);
}

TEST_CASE("mount formats: an external data file (data_file, data_file_raw)") {
  RequireMountTools();
  for (bool raw : {false, true}) {
    INFO("data_file_raw=" << raw);
    Scratch s;
    const uint64_t size = 16 * MiB, cluster = 64 * KiB;
    std::string img = s.File("disk.qcow2"), data = s.File("disk.data"), expect = s.File("expect.raw");
    QemuImgCreate(img, "16M", "data_file=" + data + (raw ? ",data_file_raw=on" : ""));
    QemuIo(img, {"write -P 0x51 1M 3M", "write -P 0x52 10M 100K"});
    Must({"qemu-img", "convert", "-O", "raw", img, expect});
    MountWriteCheck(s, img, expect, size, cluster, 600 + raw);
    if (raw) {
      // data_file_raw: the data file itself is the raw disk.
      std::string ref = s.File("ref.raw");
      CHECK(Sha256File(data) == Sha256File(ref));
    }
    CHECK(QemuInfo(img).at("format-specific").at("data").at("data-file").get<std::string>() == data);
  }
}

TEST_CASE("mount formats: extended L2 entries (subclusters), alone and over a backing file") {
  RequireMountTools();
  for (bool backing : {false, true}) {
    INFO("backing=" << backing);
    Scratch s;
    const uint64_t size = 16 * MiB, cluster = 64 * KiB;
    std::string base = s.File("base.qcow2"), img = s.File("disk.qcow2"), expect = s.File("expect.raw");
    std::vector<std::string> extra;
    if (backing) {
      QemuImgCreate(base, "16M");
      QemuIo(base, {"write -P 0x61 0 16M"});
      extra = {"-b", "base.qcow2", "-F", "qcow2"};
    }
    QemuImgCreate(img, "16M", "extended_l2=on,cluster_size=64K", extra);
    // Subcluster-sized pieces (2K), one allocated in a cluster of otherwise backing data.
    QemuIo(img, {"write -P 0x62 2048 2048", "write -P 0x63 1M 5000", "write -z 2M 4096"});
    Must({"qemu-img", "convert", "-O", "raw", img, expect});
    MountWriteCheck(s, img, expect, size, cluster, 700 + backing);
    // Subcluster-granular writes: 1 byte in subcluster 5 of cluster 40, 2K-aligned pieces.
    std::string mp = s.FileMountpoint("mp2"), ref = s.File("ref.raw");
    {
      MountGuard g(mp, {"mount", img, mp});
      REQUIRE_MOUNTED(g);
      Fd f(mp, O_RDWR);
      Fd r(ref, O_RDWR);
      const uint64_t c40 = 40 * cluster;
      struct W {
        uint64_t off;
        uint64_t len;
      };
      for (W w : {W{c40 + 5 * 2048 + 7, 1}, W{c40 + 8 * 2048, 2048}, W{c40 + 20 * 2048 - 10, 20}, W{c40 + 31 * 2048, 2048}}) {
        std::vector<char> d(w.len, static_cast<char>(0x70 + w.len % 7));
        REQUIRE(PwriteAll(f.get(), d.data(), w.len, w.off));
        REQUIRE(PwriteAll(r.get(), d.data(), w.len, w.off));
      }
      REQUIRE(::fallocate(f.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, c40 + 2048, 4096) == 0);
      std::vector<char> z(4096, 0);
      REQUIRE(PwriteAll(r.get(), z.data(), 4096, c40 + 2048));
      REQUIRE(::fsync(f.get()) == 0);
      std::vector<char> got = ReadRange(mp, c40 - cluster, 3 * cluster), want = ReadRange(ref, c40 - cluster, 3 * cluster);
      CHECK(FirstDiff(got.data(), want.data(), got.size()) == -1);
      f.Close();
      CHECK_UNMOUNTS(g);
    }
    CheckClean(img);
    CheckSameContent(img, ref);
  }
}

TEST_CASE("mount formats: small and large clusters, refcount widths, lazy refcounts") {
  RequireMountTools();
  struct Variant {
    const char* opts;
    uint64_t cluster;
  };
  const Variant variants[] = {
      {"cluster_size=512", 512},
      {"cluster_size=2M", 2 * MiB},
      {"refcount_bits=1", 64 * KiB},
      {"refcount_bits=64,cluster_size=4K", 4 * KiB},
      {"lazy_refcounts=on", 64 * KiB},
  };
  uint64_t seed = 800;
  for (const Variant& v : variants) {
    INFO("qemu-img create -o " << v.opts);
    Scratch s;
    const uint64_t size = 24 * MiB;
    std::string img = s.File("disk.qcow2"), expect = s.File("expect.raw");
    QemuImgCreate(img, "24M", v.opts);
    QemuIo(img, {"write -P 0x81 1M 1M", "write -P 0x82 20M 3000"});
    Must({"qemu-img", "convert", "-O", "raw", img, expect});
    MountWriteCheck(s, img, expect, size, v.cluster, seed++);
  }
}
