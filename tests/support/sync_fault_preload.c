/* sync_fault_preload: an LD_PRELOAD library that injects host faults into a process
 * (the qcowfs daemon) without hooks in the product: it wraps fsync/fdatasync and
 * pwrite/pwritev on regular files and block devices (never /dev/fuse or other character
 * devices, pipes or sockets). Environment, read once at load:
 *
 *   QCOWFS_FAULT_KILL_AT_SYNC=N        the N-th sync (1-based) raises SIGKILL on the process
 *                                      before it reaches the kernel: everything written
 *                                      before survives in the page cache, the sync does not
 *                                      complete (a process kill at that sync point).
 *   QCOWFS_FAULT_FAIL_SYNC_AFTER=N     syncs from the N-th on fail with EIO (not synced).
 *   QCOWFS_FAULT_FAIL_SYNC_ONCE=N      only the N-th sync fails with EIO; later ones work
 *                                      (a host whose writeback failed once).
 *   QCOWFS_FAULT_ENOSPC_WRITE_AFTER=N  pwrite/pwritev from the N-th on fail with ENOSPC
 *                                      (nothing written).
 *   QCOWFS_FAULT_SYNC_COUNT_FILE=PATH  when a counted sync or write starts, PATH is rewritten
 *                                      with the numbers of syncs and writes so far ("S W\n";
 *                                      the test reads it to learn what a workload makes).
 *
 * The counters live in the process: a fork (daemonizing) copies them, so the daemon goes
 * on counting from where its parent stopped. Thread-safe (atomic counters).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long long kill_at_sync = -1;
static long long fail_sync_after = -1;
static long long fail_sync_once = -1;
static long long enospc_write_after = -1;
static int count_fd = -1;
static atomic_llong syncs;
static atomic_llong writes;

typedef int (*sync_fn)(int);
typedef ssize_t (*pwrite_fn)(int, const void*, size_t, off_t);
typedef ssize_t (*pwritev_fn)(int, const struct iovec*, int, off_t);

static long long env_ll(const char* name) {
  const char* v = getenv(name);
  return v != NULL && *v != '\0' ? atoll(v) : -1;
}

__attribute__((constructor)) static void init(void) {
  kill_at_sync = env_ll("QCOWFS_FAULT_KILL_AT_SYNC");
  fail_sync_after = env_ll("QCOWFS_FAULT_FAIL_SYNC_AFTER");
  fail_sync_once = env_ll("QCOWFS_FAULT_FAIL_SYNC_ONCE");
  enospc_write_after = env_ll("QCOWFS_FAULT_ENOSPC_WRITE_AFTER");
  const char* path = getenv("QCOWFS_FAULT_SYNC_COUNT_FILE");
  if (path != NULL && *path != '\0') count_fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
}

/* Regular files and block devices: what a host image lives on. */
static int counted(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISBLK(st.st_mode));
}

/* The wrapped function (looked up on every call: rare calls, and no init-order issue). */
static void* next(const char* name) {
  void* f = dlsym(RTLD_NEXT, name);
  if (f == NULL) {
    static const char msg[] = "sync_fault_preload: dlsym failed\n";
    (void)!write(2, msg, sizeof(msg) - 1);
    abort();
  }
  return f;
}

static void report(void) {
  if (count_fd < 0) return;
  char buf[64];
  int len = snprintf(buf, sizeof(buf), "%20lld %20lld\n", (long long)atomic_load(&syncs),
                     (long long)atomic_load(&writes));
  /* The real pwrite: the count file is not one of the process's writes. */
  (void)!((pwrite_fn)next("pwrite"))(count_fd, buf, (size_t)len, 0);
}

/* 0: go on; -1: fail with errno set. */
static int before_sync(int fd) {
  if (!counted(fd)) return 0;
  long long n = atomic_fetch_add(&syncs, 1) + 1;
  report();
  if (kill_at_sync > 0 && n == kill_at_sync) raise(SIGKILL);
  if ((fail_sync_after > 0 && n >= fail_sync_after) || (fail_sync_once > 0 && n == fail_sync_once)) {
    errno = EIO;
    return -1;
  }
  return 0;
}

static int before_write(int fd) {
  if ((enospc_write_after <= 0 && count_fd < 0) || !counted(fd)) return 0;
  long long n = atomic_fetch_add(&writes, 1) + 1;
  report();
  if (enospc_write_after > 0 && n >= enospc_write_after) {
    errno = ENOSPC;
    return -1;
  }
  return 0;
}

int fsync(int fd) {
  if (before_sync(fd) < 0) return -1;
  return ((sync_fn)next("fsync"))(fd);
}

int fdatasync(int fd) {
  if (before_sync(fd) < 0) return -1;
  return ((sync_fn)next("fdatasync"))(fd);
}

ssize_t pwrite(int fd, const void* buf, size_t len, off_t off) {
  if (before_write(fd) < 0) return -1;
  return ((pwrite_fn)next("pwrite"))(fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void* buf, size_t len, off_t off) {
  if (before_write(fd) < 0) return -1;
  return ((pwrite_fn)next("pwrite64"))(fd, buf, len, off);
}

ssize_t pwritev(int fd, const struct iovec* iov, int n, off_t off) {
  if (before_write(fd) < 0) return -1;
  return ((pwritev_fn)next("pwritev"))(fd, iov, n, off);
}

ssize_t pwritev64(int fd, const struct iovec* iov, int n, off_t off) {
  if (before_write(fd) < 0) return -1;
  return ((pwritev_fn)next("pwritev64"))(fd, iov, n, off);
}
