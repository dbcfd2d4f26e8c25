#include "util/status.h"

#include <doctest/doctest.h>

#include <memory>
#include <string>

namespace qcowfs {
namespace {

Status FailWith(int err) { return err == 0 ? Status::Ok() : Status::Error(err, "failed"); }

Status Chain(int err, bool* reached_end) {
  RETURN_IF_ERROR(FailWith(err));
  *reached_end = true;
  return Status::Ok();
}

Result<int> Half(int v) {
  if (v % 2 != 0) return Status::Invalid("odd: " + std::to_string(v));
  return v / 2;
}

Result<int> Quarter(int v) {
  ASSIGN_OR_RETURN(int h, Half(v));
  ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

Result<std::unique_ptr<int>> MakeBox(int v) { return std::make_unique<int>(v); }

Result<int> Unbox(int v) {
  ASSIGN_OR_RETURN(std::unique_ptr<int> box, MakeBox(v));
  return *box + 1;
}

TEST_CASE("Status: ok and error values") {
  Status ok;
  CHECK(ok.ok());
  CHECK(ok.err() == 0);
  CHECK(ok.ToString() == "OK");
  CHECK_FALSE(ok.is_corruption());

  Status e = Status::Error(ENOENT, "x: not found");
  CHECK_FALSE(e.ok());
  CHECK(e.err() == ENOENT);
  CHECK(e.message() == "x: not found");
  CHECK(e.ToString() == "x: not found");
}

TEST_CASE("Status: factories map to errno") {
  CHECK(Status::IoError("a").err() == EIO);
  CHECK(Status::Invalid("a").err() == EINVAL);
  CHECK(Status::NotSupported("a").err() == ENOTSUP);
  CHECK(Status::NoSpace("a").err() == ENOSPC);
  CHECK(Status::ReadOnly("a").err() == EROFS);
  Status c = Status::Corruption("bad L2 entry");
  CHECK(c.err() == EIO);
  CHECK(c.is_corruption());
  CHECK_FALSE(Status::IoError("a").is_corruption());
}

TEST_CASE("RETURN_IF_ERROR returns early only on error") {
  bool reached = false;
  CHECK(Chain(0, &reached).ok());
  CHECK(reached);
  reached = false;
  Status s = Chain(EIO, &reached);
  CHECK(s.err() == EIO);
  CHECK_FALSE(reached);
}

TEST_CASE("Result: value and status") {
  Result<int> r = Half(8);
  REQUIRE(r.ok());
  CHECK(r.value() == 4);
  CHECK(*r == 4);
  CHECK(r.status().ok());

  Result<int> bad = Half(3);
  CHECK_FALSE(bad.ok());
  CHECK(bad.status().err() == EINVAL);
  CHECK(bad.status().message() == "odd: 3");
}

TEST_CASE("ASSIGN_OR_RETURN propagates errors and moves values") {
  Result<int> q = Quarter(12);
  REQUIRE(q.ok());
  CHECK(q.value() == 3);
  CHECK(Quarter(6).status().err() == EINVAL);  // 6/2 = 3 is odd
  CHECK(Quarter(5).status().message() == "odd: 5");

  Result<int> u = Unbox(41);  // move-only value through the macro
  REQUIRE(u.ok());
  CHECK(u.value() == 42);
}

TEST_CASE("Result: operator-> and rvalue value()") {
  Result<std::string> r(std::string("hello"));
  CHECK(r->size() == 5);
  std::string moved = std::move(r).value();
  CHECK(moved == "hello");
}

}  // namespace
}  // namespace qcowfs
