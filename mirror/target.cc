#include "mirror/target.h"

#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "block/nbd_device.h"
#include "block/raw_file_device.h"
#include "qcow2/create.h"
#include "qcow2/image.h"

namespace qcowfs::mirror {
namespace {

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

Status Refuse(const std::string& key, const std::string& value, const std::string& why) {
  return Status::Invalid(key + " " + value + ": " + why);
}

}  // namespace

Result<Target> OpenTarget(const config::MirrorTarget& t, const SourceInfo& src, uint32_t timeout_s) {
  using config::MirrorTarget;
  Target out;
  if (t.kind == MirrorTarget::Kind::kNbd) {
    out.desc = t.nbd_uri;
    auto c = block::NbdDevice::Connect(t.nbd_uri, std::chrono::seconds(timeout_s));
    if (!c.ok()) return Refuse("target.nbd", t.nbd_uri, c.status().message());
    block::NbdDevice* nbd = c.value().get();
    out.abort = [nbd] { nbd->Abort(); };
    out.dev = std::move(c).value();
    if (out.dev->Size() != src.size)
      return Refuse("target.nbd", t.nbd_uri,
                    "the export has " + std::to_string(out.dev->Size()) + " bytes, the source " +
                        std::to_string(src.size) + " (the sizes must be equal)");
    return out;
  }
  const std::string& p = t.path;
  out.desc = p;
  for (const auto& f : src.files)
    if (SameFile(p, f)) return Refuse("target.path", p, "is the source image or a file of its backing chain");
  const bool qcow2 = t.format == MirrorTarget::Format::kQcow2;
  bool exists = ::access(p.c_str(), F_OK) == 0;
  if (t.existing && !exists) return Refuse("target.path", p, "does not exist (\"existing\": true needs the file)");
  if (!t.existing && exists) return Refuse("target.path", p, "already exists (set \"existing\": true to use it)");
  std::string backing = src.top_backing, backing_format = src.top_backing_format;
  if (!t.backing.empty()) {
    if (src.top_backing.empty())
      return Refuse("target.backing", t.backing,
                    "the source has no backing file (sync \"top\" then copies everything; leave target.backing out)");
    // Stored as given; a relative name is relative to the target's directory.
    std::string dir = p.rfind('/') == std::string::npos ? "." : p.substr(0, std::max<size_t>(1, p.rfind('/')));
    std::string rp = t.backing[0] == '/' ? t.backing : dir + "/" + t.backing;
    int fd = ::open(rp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Refuse("target.backing", t.backing, strerror(errno));
    uint8_t magic[4] = {};
    ssize_t got = ::pread(fd, magic, 4, 0);
    ::close(fd);
    if (!src.files.empty() && SameFile(rp, src.files[0]))
      return Refuse("target.backing", t.backing, "is the source image itself");
    backing = t.backing;
    backing_format = got == 4 && magic[0] == 'Q' && magic[1] == 'F' && magic[2] == 'I' && magic[3] == 0xfb ? "qcow2" : "raw";
  }
  bool created = false;
  auto undo = [&](Status s) -> Status {
    if (created) ::unlink(p.c_str());
    return s;
  };
  if (!exists) {
    if (qcow2) {
      qcow2::CreateOptions co;
      co.size = src.size;
      co.cluster_bits = src.cluster_bits;
      co.backing_file = backing;
      co.backing_format = backing_format;
      co.sync = false;  // flushed with the rest before the job is ready
      Status s = qcow2::CreateFile(p, co);
      if (!s.ok()) return Refuse("target.path", p, s.message());
    } else {
      int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      if (fd < 0) return Refuse("target.path", p, strerror(errno));
      int rc = ::ftruncate(fd, static_cast<off_t>(src.size));
      int err = errno;
      ::close(fd);
      if (rc != 0) {
        ::unlink(p.c_str());
        return Refuse("target.path", p, strerror(err));
      }
    }
    created = true;
    out.known_zero = backing.empty();  // with a backing file it reads the base
  }
  if (qcow2) {
    qcow2::OpenOptions o;
    auto img = qcow2::Qcow2Image::Open(p, o);
    if (!img.ok()) return undo(Refuse("target.path", p, img.status().message()));
    out.dev = std::move(img).value();
  } else {
    auto f = block::RawFileDevice::Open(p, false, block::LockMode::kExclusive);
    if (!f.ok()) return undo(Refuse("target.path", p, f.status().message()));
    out.dev = std::move(f).value();
  }
  if (out.dev->Size() != src.size)
    return undo(Refuse("target.path", p,
                       "has " + std::to_string(out.dev->Size()) + " bytes, the source " + std::to_string(src.size) +
                           " (the sizes must be equal)"));
  return out;
}

}  // namespace qcowfs::mirror
