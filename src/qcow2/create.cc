#include "qcow2/create.h"

#include <fcntl.h>
#include <unistd.h>

#include "block/raw_file_device.h"
#include "qcow2/format.h"
#include "qcow2/header.h"
#include "util/endian.h"
#include "util/fd.h"

namespace qcowfs::qcow2 {

Status CreateOn(block::BlockDevice* host, const CreateOptions& o) {
  if (o.cluster_bits < kMinClusterBits || o.cluster_bits > kMaxClusterBits)
    return Status::Invalid("cluster size must be a power of two from 512 to 2M");
  if (o.version != 2 && o.version != 3) return Status::Invalid("version must be 2 or 3");
  if (o.version == 2 && (o.lazy_refcounts || o.extended_l2 || o.refcount_order != 4 || !o.data_file.empty()))
    return Status::Invalid("version 2 images support no lazy refcounts, extended L2, data file or refcount width other than 16");
  if (o.refcount_order > 6) return Status::Invalid("refcount bits must be 1, 2, 4, 8, 16, 32 or 64");
  if (o.extended_l2 && o.cluster_bits < 14) return Status::Invalid("extended L2 entries need clusters of at least 16K");
  if (o.data_file_raw && !o.backing_file.empty()) return Status::Invalid("a raw data file cannot have a backing file");
  Header h;
  h.version = o.version;
  h.cluster_bits = o.cluster_bits;
  h.size = o.size;
  h.refcount_order = o.refcount_order;
  h.backing_file = o.backing_file;
  h.backing_format = o.backing_format;
  h.data_file = o.data_file;
  if (o.lazy_refcounts) h.compatible |= kCompatLazyRefcounts;
  if (o.extended_l2) h.incompatible |= kIncompatExtendedL2;
  if (!o.data_file.empty()) h.incompatible |= kIncompatDataFile;
  if (o.data_file_raw) h.autoclear |= kAutoclearDataFileRaw;
  Geometry g = h.geometry();
  const uint64_t cs = g.cluster_size;
  uint64_t l1_entries = (o.size + g.l2_span() - 1) / g.l2_span();
  if (l1_entries * 8 > kMaxL1Bytes) return Status::Invalid("virtual size too large for this cluster size");
  uint64_t l1c = (l1_entries * 8 + cs - 1) / cs;
  uint64_t rb = 1, rt = 1;
  for (;;) {
    uint64_t total = 1 + rt + rb + l1c;
    uint64_t nrb = (total + g.refblock_entries - 1) / g.refblock_entries;
    uint64_t nrt = (nrb * 8 + cs - 1) / cs;
    if (nrb == rb && nrt == rt) break;
    rb = nrb;
    rt = nrt;
  }
  // Layout: header, refcount table, refcount blocks, L1 table.
  h.refcount_table_offset = cs;
  h.refcount_table_clusters = static_cast<uint32_t>(rt);
  h.l1_table_offset = (1 + rt + rb) * cs;
  h.l1_size = static_cast<uint32_t>(l1_entries);
  ASSIGN_OR_RETURN(std::vector<uint8_t> c0, BuildHeaderCluster(&h));
  uint64_t total = 1 + rt + rb + l1c;
  std::vector<uint8_t> meta((total - 1) * cs, 0);
  for (uint64_t b = 0; b < rb; b++) StoreBE64(&meta[b * 8], (1 + rt + b) * cs);
  for (uint64_t c = 0; c < total; c++) {
    uint8_t* block = &meta[(rt + c / g.refblock_entries) * cs];
    SetRefcount(block, c % g.refblock_entries, g.refcount_order, 1);
  }
  RETURN_IF_ERROR(host->Resize(0));
  RETURN_IF_ERROR(host->Write(0, c0.data(), c0.size()));
  RETURN_IF_ERROR(host->Write(cs, meta.data(), meta.size()));
  return o.sync ? host->Flush() : Status::Ok();
}

Status CreateFile(const std::string& path, const CreateOptions& opts) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Status::Error(errno, ErrnoMessage(path, errno));
  ::close(fd);
  auto dev = block::RawFileDevice::Open(path, false, block::LockMode::kExclusive);
  if (!dev.ok()) {
    ::unlink(path.c_str());
    return dev.status();
  }
  Status s = CreateOn(dev.value().get(), opts);
  if (!s.ok()) ::unlink(path.c_str());
  return s;
}

}  // namespace qcowfs::qcow2
