// The kernel's FUSE-over-io_uring ABI (Linux 6.14+, FUSE protocol 7.42), described
// here because the linux/fuse.h of the distributions we build on (Debian 12: 7.38)
// lacks it. Layouts and numbers must match the kernel's include/uapi/linux/fuse.h;
// static_asserts below pin the sizes and offsets. How the kernel uses them
// (fs/fuse/dev_uring.c):
//
// * Negotiation: the kernel sets FUSE_OVER_IO_URING in the INIT request when its
//   module parameter enable_uring is Y (needs CONFIG_FUSE_IO_URING); the server sets
//   it in the INIT reply to take it. Bits 32..63 of the INIT flags travel in flags2,
//   which counts only when FUSE_INIT_EXT is set in flags. From the INIT reply on, every
//   request waits in the kernel until the ring is "ready" (below) or a REGISTER
//   failed (which turns the ring off for the connection): a server that negotiates it
//   must register, or fail a REGISTER, or nothing is served.
// * Queues: one per possible CPU (num_possible_cpus(), /sys/devices/system/cpu/possible);
//   a request goes to the queue of the CPU its task runs on. The ring becomes ready,
//   and the kernel sends requests through it instead of /dev/fuse, once every queue
//   has at least one registered entry. FORGET, INTERRUPT and notifications stay on
//   /dev/fuse, as does INIT itself.
// * Commands: SQEs of IORING_OP_URING_CMD on the /dev/fuse fd, in a ring set up with
//   IORING_SETUP_SQE128 (the 80-byte command area sqe->cmd holds fuse_uring_cmd_req);
//   sqe->cmd_op is the command:
//   - REGISTER: sqe->addr points to 2 iovecs, sqe->len = 2: iov[0] the entry's
//     fuse_uring_req_header (at least sizeof), iov[1] its payload buffer (at least
//     max(8 KiB, max_write, max_pages * page size) as negotiated in INIT). cmd.qid is
//     the queue. The SQE completes (res 0) when a request was copied into the entry.
//   - COMMIT_AND_FETCH: the reply to the entry's request (cmd.commit_id = the request's
//     ring_ent_in_out.commit_id, cmd.qid), and the entry is available again; the SQE
//     completes with the next request. No iovecs (the buffers are the registered ones).
//   A completion with res < 0 ends the entry: -ENOTCONN when the connection is torn
//   down (unmount, abort) or the io_uring is closed.
// * Request layout in an entry: in_out holds the fuse_in_header; op_in the opcode's
//   fixed argument struct (fuse_read_in, fuse_write_in, ...; nothing for opcodes
//   without one); the payload buffer the remaining arguments (write data, names), its
//   length in ring_ent_in_out.payload_sz. So the op_in length is
//   in.len - sizeof(fuse_in_header) - payload_sz.
// * Reply layout: in_out holds the fuse_out_header (error, unique = the request's;
//   len is not read), the payload buffer the reply's arguments concatenated,
//   ring_ent_in_out.payload_sz their length. op_in is unused.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qcowfs::fuse::uring {

// INIT flag (flags2 bit 9 once shifted: bits 32..63 of the flags go in flags2).
constexpr uint64_t kFuseOverIoUring = 1ULL << 41;
// The INIT flag that makes flags2 count (linux/fuse.h FUSE_INIT_EXT).
constexpr uint32_t kFuseInitExt = 1u << 30;

constexpr size_t kInOutHeaderSize = 128;  // FUSE_URING_IN_OUT_HEADER_SZ
constexpr size_t kOpInOutSize = 128;      // FUSE_URING_OP_IN_OUT_SZ

// struct fuse_uring_ent_in_out: per-entry metadata, both directions.
struct EntInOut {
  uint64_t flags;       // none defined yet; 0
  uint64_t commit_id;   // set by the kernel with a request; echoed in the commit
  uint32_t payload_sz;  // bytes valid in the payload buffer (request, then reply)
  uint32_t padding;
  uint64_t reserved;
};

// struct fuse_uring_req_header: iov[0] of a REGISTER.
struct ReqHeader {
  char in_out[kInOutHeaderSize];  // fuse_in_header (request) / fuse_out_header (reply)
  char op_in[kOpInOutSize];       // the opcode's fixed in-argument (request only)
  EntInOut ring_ent_in_out;
};

// enum fuse_uring_cmd: sqe->cmd_op.
enum Cmd : uint32_t {
  kCmdInvalid = 0,
  kCmdRegister = 1,        // FUSE_IO_URING_CMD_REGISTER
  kCmdCommitAndFetch = 2,  // FUSE_IO_URING_CMD_COMMIT_AND_FETCH
};

// struct fuse_uring_cmd_req: the start of the SQE's 80-byte command area (the rest 0).
struct CmdReq {
  uint64_t flags;      // 0
  uint64_t commit_id;  // COMMIT_AND_FETCH: the request's commit_id; REGISTER: 0
  uint16_t qid;        // the queue (CPU index)
  uint8_t padding[6];
};

// The number of iovecs a REGISTER carries (FUSE_URING_IOV_SEGS).
constexpr unsigned kRegisterIovecs = 2;

static_assert(sizeof(EntInOut) == 32);
static_assert(offsetof(EntInOut, commit_id) == 8 && offsetof(EntInOut, payload_sz) == 16);
static_assert(sizeof(ReqHeader) == 288);
static_assert(offsetof(ReqHeader, op_in) == 128 && offsetof(ReqHeader, ring_ent_in_out) == 256);
static_assert(sizeof(CmdReq) == 24 && offsetof(CmdReq, qid) == 16);

}  // namespace qcowfs::fuse::uring
