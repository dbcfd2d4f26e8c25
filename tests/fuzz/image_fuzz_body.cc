#include "fuzz/image_fuzz_body.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "qcow2/image.h"
#include "support/mem_device.h"

namespace qcowfs::fuzz {
namespace {

using block::BlockDevice;
using qcow2::OpenDevices;
using qcow2::OpenOptions;
using qcow2::Qcow2Image;
using testing::MemDevice;

// No device may grow past this: a mutated header must not make a write balloon memory.
constexpr uint64_t kDeviceCap = 256ull << 20;
// Largest single read or write (the largest cluster size, 2 MiB).
constexpr uint64_t kMaxIo = 2ull << 20;
constexpr uint64_t kBackingSize = 1ull << 20;
constexpr uint64_t kMaxStatusLen = 1ull << 20;

// A MemDevice that refuses to grow past a cap (writes, zeroing and resizes beyond it
// fail with ENOSPC, as a full disk would).
class CappedDevice final : public BlockDevice {
 public:
  explicit CappedDevice(uint64_t cap) : cap_(cap) {}

  Status Read(uint64_t offset, void* buf, size_t len) override { return mem_.Read(offset, buf, len); }
  Status Write(uint64_t offset, const void* buf, size_t len) override {
    if (!Fits(offset, len)) return Status::NoSpace("fuzz device: write past the cap");
    return mem_.Write(offset, buf, len);
  }
  Status WriteZeroes(uint64_t offset, uint64_t len, bool may_unmap) override {
    if (!Fits(offset, len)) return Status::NoSpace("fuzz device: zeroing past the cap");
    return mem_.WriteZeroes(offset, len, may_unmap);
  }
  Status Discard(uint64_t offset, uint64_t len) override { return mem_.Discard(offset, len); }
  Status Flush() override { return mem_.Flush(); }
  Result<block::BlockStatus> GetBlockStatus(uint64_t offset, uint64_t len) override {
    return mem_.GetBlockStatus(offset, len);
  }
  uint64_t Size() const override { return mem_.Size(); }
  Status Resize(uint64_t new_size) override {
    if (new_size > cap_) return Status::NoSpace("fuzz device: resize past the cap");
    return mem_.Resize(new_size);
  }
  bool read_only() const override { return false; }
  uint64_t AllocatedBytes() const override { return mem_.AllocatedBytes(); }
  uint64_t cap() const { return cap_; }

 private:
  bool Fits(uint64_t offset, uint64_t len) const { return offset <= cap_ && len <= cap_ - offset; }

  const uint64_t cap_;
  MemDevice mem_;
};

[[noreturn]] void Fail(const char* what, uint64_t off, uint64_t len) {
  std::fprintf(stderr, "image fuzz: %s (offset %llu, length %llu)\n", what,
               static_cast<unsigned long long>(off), static_cast<unsigned long long>(len));
  std::abort();
}

// Never-zero pseudo-random bytes, made once: writes take slices of it (filling buffers
// per input would dominate the run time under coverage instrumentation).
const std::vector<uint8_t>& PatternBytes() {
  static const std::vector<uint8_t> bytes = [] {
    std::vector<uint8_t> b(kMaxIo + 4096);
    uint32_t x = 12345;
    for (auto& c : b) {
      x = x * 1103515245u + 12345u;
      c = static_cast<uint8_t>(x >> 24) | 1;  // never zero: zeroing is visible
    }
    return b;
  }();
  return bytes;
}
const uint8_t* Pattern(uint32_t seed) { return PatternBytes().data() + (seed * 509u) % 4096; }

const std::vector<uint8_t>& Zeros() {
  static const std::vector<uint8_t> zeros(kMaxIo, 0);
  return zeros;
}

// Buffers reused across inputs, so a run does not map and unmap megabytes each time.
struct Scratch {
  std::vector<uint8_t> a, b;
};
Scratch& GetScratch() {
  static Scratch s;
  return s;
}

// Runs bounded operations on one open image. Every offset is clamped into the image
// and every length to kMaxIo, so an input runs in milliseconds whatever its header says.
class Runner {
 public:
  // check_data: assert what the data reads after each operation. Off for images
  // whose refcounts undercount references (CheckRefcounts fails): a new allocation
  // can land on a cluster still in use, and like QEMU we do not scan for that.
  Runner(Qcow2Image* img, bool writable, bool check_data)
      : img_(img), writable_(writable), check_data_(check_data), cs_(img->geometry().cluster_size),
        buf_(GetScratch().a), before_(GetScratch().b) {}

  uint64_t cluster_size() const { return cs_; }
  uint64_t size() const { return img_->Size(); }
  uint64_t LastCluster() const { return size() ? (size() - 1) & ~(cs_ - 1) : 0; }

  void Read(uint64_t off, uint64_t len) {
    if (!Clamp(&off, &len)) return;
    buf_.resize(len);
    (void)img_->Read(off, buf_.data(), len);
  }

  // Raw calls with unclamped arguments (past the end, overflowing): must fail cleanly.
  void ReadRaw(uint64_t off, uint64_t len) {
    buf_.resize(std::min(len, kMaxIo));
    (void)img_->Read(off, buf_.data(), buf_.size());
  }
  void WriteRaw(uint64_t off, uint64_t len) {
    if (!writable_) return;
    (void)img_->Write(off, Pattern(9), std::min(len, kMaxIo));
  }

  void Write(uint64_t off, uint64_t len, uint32_t seed) {
    if (!writable_ || !Clamp(&off, &len)) return;
    const uint8_t* data = Pattern(seed);
    if (!img_->Write(off, data, len).ok()) return;
    Expect(off, len, data, "a write does not read back");
  }

  void Zero(uint64_t off, uint64_t len, bool may_unmap) {
    if (!writable_ || !Clamp(&off, &len)) return;
    if (!img_->WriteZeroes(off, len, may_unmap).ok()) return;
    ExpectZeros(off, len, "WriteZeroes left non-zero data");
  }

  void Discard(uint64_t off, uint64_t len) {
    if (!writable_ || !Clamp(&off, &len)) return;
    if (!img_->Discard(off, len).ok()) return;
    ExpectZeros(off, len, "Discard left non-zero data");
  }

  void Allocate(uint64_t off, uint64_t len) {
    if (!writable_ || !Clamp(&off, &len)) return;
    // Allocate must not change what the range reads.
    before_.resize(len);
    if (!img_->Read(off, before_.data(), len).ok()) return;
    if (!img_->Allocate(off, len).ok()) return;
    Expect(off, len, before_.data(), "Allocate changed the data");
  }

  // Follows GetBlockStatus from off for at most `steps` extents, checking the contract:
  // 0 < length <= the length asked for. Each request is capped at kMaxStatusLen: the
  // engine maps the whole requested range per call, so a walk over a large image with
  // many short extents would take seconds.
  void StatusWalk(uint64_t off, int steps) {
    uint64_t end = size();
    for (int i = 0; i < steps && off < end; i++) {
      uint64_t want = std::min(end - off, kMaxStatusLen);
      auto r = img_->GetBlockStatus(off, want);
      if (!r.ok()) return;
      if (r->length == 0 || r->length > want) Fail("GetBlockStatus returned a bad length", off, r->length);
      off += r->length;
    }
  }

  void Flush() { (void)img_->Flush(); }

  void Grow(uint64_t by) {
    if (!writable_) return;
    uint64_t s = size();
    if (s > (1ull << 50)) return;
    (void)img_->Resize(s + by);
  }

 private:
  bool Clamp(uint64_t* off, uint64_t* len) const {
    uint64_t s = size();
    if (s == 0) return false;
    if (*off >= s) *off %= s;
    *len = std::min({*len, s - *off, kMaxIo});
    return *len > 0;
  }

  void Expect(uint64_t off, uint64_t len, const uint8_t* want, const char* what) {
    if (!check_data_) return;
    buf_.resize(len);
    if (!img_->Read(off, buf_.data(), len).ok()) return;  // a failing read is allowed
    if (std::memcmp(buf_.data(), want, len) != 0) Fail(what, off, len);
  }

  void ExpectZeros(uint64_t off, uint64_t len, const char* what) {
    if (!check_data_) return;
    buf_.resize(len);
    if (!img_->Read(off, buf_.data(), len).ok()) return;
    if (std::memcmp(buf_.data(), Zeros().data(), len) != 0) Fail(what, off, len);
  }

  Qcow2Image* img_;
  const bool writable_;
  const bool check_data_;
  const uint64_t cs_;
  std::vector<uint8_t>& buf_;
  std::vector<uint8_t>& before_;
};

void Reads(Runner* r) {
  const uint64_t cs = r->cluster_size(), s = r->size(), last = r->LastCluster();
  r->Read(0, std::min<uint64_t>(2 * cs, 1 << 20));
  r->Read(last, cs);
  r->Read(s / 2 > 1000 ? s / 2 - 1000 : 0, 5000);
  r->Read(s ? s - 1 : 0, 1);
  r->StatusWalk(0, 64);
  r->StatusWalk(last, 4);
}

// Up to four operations steered by the input's last 16 bytes (4 bytes each: kind,
// offset low, offset high, length), so the fuzzer can reach ranges the fixed sequence
// does not.
void ScriptedOps(Runner* r, const uint8_t* data, size_t size) {
  if (size < 512) return;
  const uint8_t* p = data + size - 16;
  const uint64_t cs = r->cluster_size();
  const uint64_t unit = std::max<uint64_t>(cs / 4, 512);
  const uint64_t len_unit = std::max<uint64_t>(cs / 16, 64);
  for (int i = 0; i < 4; i++, p += 4) {
    const uint8_t kind = p[0];
    uint64_t off = (uint64_t{p[1]} | uint64_t{p[2]} << 8) * unit;
    const uint64_t s = r->size();
    if ((kind & 0x80) && s) off = off < s ? s - 1 - off : 0;
    const uint64_t len = (uint64_t{p[3]} + 1) * len_unit;
    switch (kind & 7) {
      case 0: r->Read(off, len); break;
      case 1: r->Write(off, len, 100 + i); break;
      case 2: r->Zero(off, len, (kind & 8) != 0); break;
      case 3: r->Discard(off, len); break;
      case 4: r->StatusWalk(off, 8); break;
      case 5: r->Flush(); break;
      case 6: r->Allocate(off, len); break;
      case 7: r->Write(off, uint64_t{p[3]} + 1, 200 + i); break;  // small, unaligned
    }
  }
}

void Mutations(Runner* r) {
  const uint64_t cs = r->cluster_size(), s = r->size(), last = r->LastCluster();
  const uint64_t mid = (s / 2) & ~(cs - 1);
  r->Write(0, 512, 1);
  r->Write(cs + 512 - 7, 1000, 2);       // unaligned, partial cluster (COW)
  r->Write(last, cs, 3);                 // the last cluster, whole
  r->Write(mid, cs, 4);                  // a whole cluster in the middle
  r->Write(mid + cs - 100, 200, 5);      // straddling two clusters
  r->Zero(cs / 2, cs, true);
  r->Zero(last, cs, false);
  r->Discard(0, 2 * cs);
  r->Discard(mid > cs ? mid - cs : 0, 3 * cs);
  r->Write(0, cs, 6);                    // reallocate what was discarded
  r->Allocate(2 * cs, cs);
  r->ReadRaw(s, 512);                    // past the end
  r->ReadRaw(UINT64_MAX - 511, 1024);    // offset + len overflows
  r->WriteRaw(s ? s - 1 : 0, 2);         // straddles the end
  r->WriteRaw(UINT64_MAX - 511, 1024);
}

OpenOptions Options(bool read_only) {
  OpenOptions o;
  o.read_only = read_only;
  o.lock = false;
  o.cache_size = 256 << 10;
  o.max_backing_depth = 2;
  return o;
}

}  // namespace

void RunImageInput(const uint8_t* data, size_t size) {
  CappedDevice host(std::max<uint64_t>(kDeviceCap, size));
  if (size > 0 && !host.Write(0, data, size).ok()) return;
  // The header's backing and data-file names are never opened: in-memory devices stand
  // in. A backing device only when the header names one (backing_file_offset != 0),
  // so images without one keep reading zeros from unallocated clusters.
  bool has_backing = false;
  for (size_t i = 8; i < 16 && i < size; i++) has_backing |= data[i] != 0;
  CappedDevice backing(kDeviceCap), data_file(kDeviceCap);
  if (has_backing) (void)backing.Write(0, Pattern(77), kBackingSize);
  OpenDevices devs;
  devs.host = &host;
  devs.backing = has_backing ? &backing : nullptr;
  devs.data_file = &data_file;
  devs.name = "fuzz.qcow2";

  bool writable = true;
  auto r = Qcow2Image::OpenOn(devs, Options(false));
  if (!r.ok()) {
    writable = false;
    r = Qcow2Image::OpenOn(devs, Options(true));
    if (!r.ok()) return;
  }
  {
    std::unique_ptr<Qcow2Image> img = std::move(r).value();
    const bool can_write = writable && !img->read_only();
    // Only clusters the capped device can reach matter: nothing is allocated past it.
    Runner run(img.get(), can_write, !can_write || img->CheckRefcounts(host.cap()).ok());
    Reads(&run);
    if (writable) {
      Mutations(&run);
      ScriptedOps(&run, data, size);
      run.Flush();
      const uint64_t old_size = run.size();
      run.Grow(run.cluster_size());
      run.Write(old_size, std::min<uint64_t>(run.cluster_size(), 4096), 7);
      run.StatusWalk(0, 64);
      run.Flush();
    } else {
      ScriptedOps(&run, data, size);  // writes are skipped on a read-only image
    }
    // What `qcowfs info` / status report.
    (void)img->Stats();
    (void)img->AllocatedBytes();
    (void)img->BackingChain();
    (void)img->header();
    (void)img->Close();
  }
  if (!writable) return;
  // What the engine wrote must open again and read without crashing.
  auto again = Qcow2Image::OpenOn(devs, Options(true));
  if (!again.ok()) return;
  Runner run(again.value().get(), false, true);
  Reads(&run);
}

}  // namespace qcowfs::fuzz
