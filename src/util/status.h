// Status and Result<T>: errno-native error values for the engine.
// No exceptions cross src/, fuse/ or mirror/; every fallible call returns one of these.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace qcowfs {

class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Error(int err, std::string msg) { return Status(err, std::move(msg)); }
  static Status IoError(std::string msg) { return Status(EIO, std::move(msg)); }
  static Status Invalid(std::string msg) { return Status(EINVAL, std::move(msg)); }
  static Status NotSupported(std::string msg) { return Status(ENOTSUP, std::move(msg)); }
  // Corruption maps to EIO; the image marks itself corrupt separately.
  static Status Corruption(std::string msg) { return Status(EIO, std::move(msg), true); }
  static Status NoSpace(std::string msg) { return Status(ENOSPC, std::move(msg)); }
  static Status ReadOnly(std::string msg) { return Status(EROFS, std::move(msg)); }

  bool ok() const { return err_ == 0; }
  int err() const { return err_; }
  bool is_corruption() const { return corruption_; }
  const std::string& message() const { return msg_; }
  std::string ToString() const { return ok() ? "OK" : msg_; }

 private:
  Status(int err, std::string msg, bool corruption = false)
      : err_(err), corruption_(corruption), msg_(std::move(msg)) {}
  int err_ = 0;
  bool corruption_ = false;
  std::string msg_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}           // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}    // NOLINT
  bool ok() const { return v_.index() == 0; }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<1>(v_);
  }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }

 private:
  std::variant<T, Status> v_;
};

#define QCOWFS_CONCAT_INNER(a, b) a##b
#define QCOWFS_CONCAT(a, b) QCOWFS_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                   \
  do {                                          \
    ::qcowfs::Status _st = (expr);              \
    if (!_st.ok()) return _st;                  \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(QCOWFS_CONCAT(_res_, __LINE__), lhs, expr)

}  // namespace qcowfs
