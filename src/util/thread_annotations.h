// Clang thread-safety annotations; no-ops for other compilers.
#pragma once

#if defined(__clang__)
#define QCOWFS_TA(x) __attribute__((x))
#else
#define QCOWFS_TA(x)
#endif

#define CAPABILITY(x) QCOWFS_TA(capability(x))
#define SCOPED_CAPABILITY QCOWFS_TA(scoped_lockable)
#define GUARDED_BY(x) QCOWFS_TA(guarded_by(x))
#define PT_GUARDED_BY(x) QCOWFS_TA(pt_guarded_by(x))
#define ACQUIRED_BEFORE(...) QCOWFS_TA(acquired_before(__VA_ARGS__))
#define ACQUIRED_AFTER(...) QCOWFS_TA(acquired_after(__VA_ARGS__))
#define REQUIRES(...) QCOWFS_TA(requires_capability(__VA_ARGS__))
#define REQUIRES_SHARED(...) QCOWFS_TA(requires_shared_capability(__VA_ARGS__))
#define ACQUIRE(...) QCOWFS_TA(acquire_capability(__VA_ARGS__))
#define ACQUIRE_SHARED(...) QCOWFS_TA(acquire_shared_capability(__VA_ARGS__))
#define RELEASE(...) QCOWFS_TA(release_capability(__VA_ARGS__))
#define RELEASE_SHARED(...) QCOWFS_TA(release_shared_capability(__VA_ARGS__))
#define EXCLUDES(...) QCOWFS_TA(locks_excluded(__VA_ARGS__))
#define RETURN_CAPABILITY(x) QCOWFS_TA(lock_returned(x))
#define NO_THREAD_SAFETY_ANALYSIS QCOWFS_TA(no_thread_safety_analysis)
