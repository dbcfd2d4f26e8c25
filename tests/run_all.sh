#!/usr/bin/env bash
# The project's test command (what .ci/run and README.md run). From the repository root:
#   bash tests/run_all.sh             gcc build + ctest (and integ_mount/integ_stress
#                                     again with --cache none), the Debian package (built,
#                                     installed, smoke-tested, linted, purged: root
#                                     only), ASan/UBSan build + ctest, clang-14
#                                     -Wthread-safety build, TSan concurrency tests,
#                                     libFuzzer (1 minute per target)
#   QCOWFS_QUICK=1 bash tests/run_all.sh   only the first (for local iteration)
# Every build here passes -DQCOWFS_WERROR=ON: warnings are errors in CI (a user's build
# defaults to OFF).
# Environment: JOBS (default 2) for build and ctest parallelism; CI=true turns a missing
# tool from a skip into a failure; QCOWFS_FUZZ_TIME (default 60) seconds per fuzz target.
set -euo pipefail

cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
QUICK="${QCOWFS_QUICK:-0}"
summary=()

current=""
step() {
  current="$*"
  printf '\n==== %s ====\n' "$*"
}
on_exit() {
  local rc=$?
  if [[ $rc != 0 ]]; then
    printf '\n==== summary ====\n'
    for s in "${summary[@]}"; do echo "  $s"; done
    echo "FAILED (exit $rc) in: ${current:-setup}"
  fi
}
trap on_exit EXIT

# build_and_test DIR CTEST(yes|no) CMAKE_ARGS...
build_and_test() {
  local dir="$1" run_tests="$2"
  shift 2
  cmake -S . -B "$dir" "$@"
  cmake --build "$dir" -j"$JOBS"
  if [[ "$run_tests" == yes ]]; then
    (cd "$dir" && ctest --output-on-failure -j"$JOBS")
  fi
}

# Prints the tools in "$@" that are not installed; succeeds only when none is missing.
missing_tools() {
  local out=()
  for t in "$@"; do command -v "$t" >/dev/null || out+=("$t"); done
  echo "${out[*]}"
  [[ ${#out[@]} == 0 ]]
}
skip_or_fail() {
  if [[ "${CI:-}" == true ]]; then
    echo "$1 (CI=true: failing)"
    return 1
  fi
  echo "SKIPPED: $1"
  summary+=("skipped: $1")
}

# run_fuzzer TARGET: fuzz build-fuzz/seeds/TARGET for FUZZ_TIME seconds on a copy of the
# seeds; a crash, leak, timeout or OOM fails the step and names the saved input.
FUZZ_TIME="${QCOWFS_FUZZ_TIME:-60}"
run_fuzzer() {
  local t="$1" dir="build-fuzz/fuzz-run/$1"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  cp build-fuzz/seeds/"$t"/* "$dir/corpus/"
  local start=$SECONDS rc=0
  # Every seed once at full size (the fuzzing run truncates inputs to -max_len, 1 MiB, so
  # the 2 MiB-cluster images are only exercised here), then fuzz.
  local -x UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
  build-fuzz/tests/fuzz/fuzz_"$t" -rss_limit_mb=2048 -timeout=10 \
    -artifact_prefix="$dir/artifacts/" "$dir"/corpus/* >"$dir/log" 2>&1 || rc=$?
  if [[ $rc == 0 ]]; then
    build-fuzz/tests/fuzz/fuzz_"$t" -max_total_time="$FUZZ_TIME" -max_len=1048576 \
      -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
      "$dir/corpus" >>"$dir/log" 2>&1 || rc=$?
  fi
  if [[ $rc != 0 ]]; then
    grep -v '^qcowfs: ' "$dir/log" | tail -n 50
    echo "fuzz_$t FAILED (exit $rc) after $((SECONDS - start))s; full log: $dir/log"
    local inputs=("$dir"/artifacts/*)
    # A seed that fails on replay is not copied to artifacts/: name the last one run.
    [[ -e "${inputs[0]}" ]] || inputs=("$(sed -n 's/^Running: //p' "$dir/log" | tail -n 1)")
    for f in "${inputs[@]}"; do
      echo "crash input: $f  (save it as tests/fuzz/regressions/$t/<short-name>)"
    done
    return 1
  fi
  grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$dir/log" || true
  echo "fuzz_$t: no findings in $((SECONDS - start))s; corpus $(ls "$dir/corpus" | wc -l) inputs"
}

step "gcc: optimised build with assertions (build/)"
build_and_test build yes -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_WERROR=ON \
  -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++
summary+=("gcc RelWithDebInfo + ctest: ok")

step "gcc: the mount and stress tests again with --cache none (O_DIRECT, 4K read-modify-write)"
# QCOWFS_TEST_CACHE makes every `qcowfs mount` of the tests run with --cache none;
# QCOWFS_TEST_DIO_ALIGN=4096 makes the daemon treat the host as 4K-sector.
cache_none_start=$SECONDS
(cd build && QCOWFS_TEST_CACHE=none QCOWFS_TEST_DIO_ALIGN=4096 \
  ctest --output-on-failure -j"$JOBS" -R '^integ_(mount|stress)$')
summary+=("gcc ctest integ_mount + integ_stress with --cache none: ok ($((SECONDS - cache_none_start))s)")

# The mount suite once more over FUSE io_uring (--transport ring on every mount): needs
# the kernel's enable_uring parameter, which is set for the pass and put back after.
step "gcc: the mount tests over FUSE io_uring (QCOWFS_TEST_TRANSPORT=ring)"
# A kernel without it is skipped even under CI=true: it is the kernel's feature, not a tool.
uring_param=/sys/module/fuse/parameters/enable_uring
uring_skip() { echo "SKIPPED: $1"; summary+=("skipped: $1"); }
if [[ ! -e $uring_param ]]; then
  uring_skip "mount tests over io_uring: this kernel has no FUSE over io_uring ($uring_param missing; Linux 6.14+, CONFIG_FUSE_IO_URING)"
elif ! uring_old=$(cat "$uring_param") || ! echo Y 2>/dev/null >"$uring_param"; then
  uring_skip "mount tests over io_uring: cannot set $uring_param (needs root)"
else
  ring_start=$SECONDS
  ring_rc=0
  (cd build && QCOWFS_TEST_TRANSPORT=ring ctest --output-on-failure -R integ_mount) || ring_rc=$?
  echo "$uring_old" >"$uring_param"
  [[ $ring_rc == 0 ]] || exit "$ring_rc"
  summary+=("gcc mount tests over FUSE io_uring: ok ($((SECONDS - ring_start)) s)")
fi

if [[ "$QUICK" != 1 ]]; then
  step "Debian package: build, lintian, install, smoke test, purge (packaging/ci-package.sh)"
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    JOBS="$JOBS" bash packaging/ci-package.sh
    summary+=("Debian package built, installed, smoke-tested, linted, purged: ok")
  else
    skip_or_fail "Debian package step: needs root and apt-get"
  fi

  step "gcc: ASan + UBSan, -O1 (build-asan/)"
  # -O1 (ASan's own advice): at -O2, UBSan's checks made this the longest build of the
  # run (18 of CI's ~55 minutes; one mount test file 72 s at -O2, 41 s at -O1).
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}" \
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    build_and_test build-asan yes -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_SANITIZE=asan -DQCOWFS_WERROR=ON \
      -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++ \
      -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g"
  summary+=("gcc ASan+UBSan + ctest: ok")

  step "clang-14: -Wthread-safety -Werror build (build-clang/)"
  # The annotated locks live in the product code: build qcowfs, the bench's null export and their libraries.
  cmake -S . -B build-clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_THREAD_SAFETY=ON -DQCOWFS_WERROR=ON \
    -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14
  cmake --build build-clang -j"$JOBS" --target qcowfs qcowfs-null-export
  summary+=("clang-14 thread-safety build: ok")

  step "gcc: TSan, the concurrency tests (build-tsan/)"
  cmake -S . -B build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_SANITIZE=tsan -DQCOWFS_WERROR=ON \
    -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++
  cmake --build build-tsan -j"$JOBS" --target unit_qcow2 unit_mirror unit_block unit_util
  # race:* (discard/rewrite races, overlapping allocations, concurrent I/O + flush),
  # inflight:* (the tracked-request table, incl. 4-thread register/release) and the mirror
  # job's unit tests (copy workers, write-blocking writes, the stale-copy races), and the
  # O_DIRECT device's read-modify-write serialization (direct:*), and the mirror filter's
  # per-request lock (reader-mostly mutex:*).
  (cd build-tsan/tests && TSAN_OPTIONS="${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}" \
    ./unit_qcow2 -tc='race:*,inflight:*' && ./unit_mirror && ./unit_block -tc='direct:*' &&
    ./unit_util -tc='reader-mostly mutex:*')
  summary+=("gcc TSan concurrency tests: ok")

  step "clang-14: libFuzzer, ${FUZZ_TIME}s per target (build-fuzz/)"
  if missing="$(missing_tools clang++-14 qemu-img qemu-io)"; then
    cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_FUZZ=ON -DQCOWFS_WERROR=ON \
      -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14
    cmake --build build-fuzz -j"$JOBS" --target fuzz_image fuzz_config
    # Saved crash inputs (tests/fuzz/regressions/) and the config seeds first.
    (cd build-fuzz && ctest --output-on-failure -R '^fuzz_')
    rm -rf build-fuzz/seeds build-fuzz/fuzz-run
    bash tests/fuzz/make_seeds.sh build-fuzz/seeds/image
    cp -r tests/fuzz/seeds/config build-fuzz/seeds/config
    run_fuzzer image
    run_fuzzer config
    summary+=("clang-14 libFuzzer (fuzz_image, fuzz_config; ${FUZZ_TIME}s each): ok")
  else
    skip_or_fail "libFuzzer pass: $missing not found"
  fi
else
  summary+=("ASan/UBSan, clang thread-safety, TSan and libFuzzer passes skipped (QCOWFS_QUICK=1)")
fi

step "summary"
for s in "${summary[@]}"; do echo "  $s"; done
echo "ALL PASSED"
