// fuse/ring.h: transport names, the kernel-side checks, and the ABI layout.
#include "fuse/ring.h"

#include <doctest/doctest.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "fuse/uring_abi.h"

namespace qcowfs::fuse {
namespace {

TEST_CASE("ring: transport names") {
  Transport t = Transport::kLegacy;
  CHECK(ParseTransport("auto", &t));
  CHECK(t == Transport::kAuto);
  CHECK(ParseTransport("ring", &t));
  CHECK(t == Transport::kRing);
  CHECK(ParseTransport("legacy", &t));
  CHECK(t == Transport::kLegacy);
  CHECK_FALSE(ParseTransport("uring", &t));
  CHECK_FALSE(ParseTransport("", &t));
  CHECK(t == Transport::kLegacy);
  for (Transport x : {Transport::kAuto, Transport::kLegacy, Transport::kRing}) {
    Transport y;
    CHECK(ParseTransport(TransportName(x), &y));
    CHECK(y == x);
  }
}

TEST_CASE("ring: one queue per possible CPU") {
  unsigned n = PossibleCpus();
  CHECK(n >= 1);
  CHECK(n >= static_cast<unsigned>(sysconf(_SC_NPROCESSORS_ONLN)));
}

TEST_CASE("ring: the reason the ring is unavailable follows the kernel's parameter") {
  std::ifstream f("/sys/module/fuse/parameters/enable_uring");
  std::string v;
  std::string why = RingUnavailableReason();
  if (!f) {
    CHECK(why.find("CONFIG_FUSE_IO_URING") != std::string::npos);
  } else {
    std::getline(f, v);
    if (v == "Y") CHECK(why.empty());
    else CHECK(why.find("enable_uring") != std::string::npos);
  }
}

TEST_CASE("ring: ABI sizes (include/uapi/linux/fuse.h)") {
  CHECK(sizeof(uring::ReqHeader) == 288);
  CHECK(sizeof(uring::CmdReq) <= 80);  // the SQE128 command area
  CHECK((uring::kFuseOverIoUring >> 32) == (1u << 9));
}

}  // namespace
}  // namespace qcowfs::fuse
