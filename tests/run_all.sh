#!/usr/bin/env bash
# The project's test command (what .ci/run and README.md run). From the repository root:
#   bash tests/run_all.sh             gcc build + ctest, ASan/UBSan build + ctest,
#                                     clang-14 -Wthread-safety build
#   QCOWFS_QUICK=1 bash tests/run_all.sh   only the first (for local iteration)
# Environment: JOBS (default 2) for build and ctest parallelism; CI=true turns a missing
# tool from a skip into a failure.
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

step "gcc: optimised build with assertions (build/)"
build_and_test build yes -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++
summary+=("gcc RelWithDebInfo + ctest: ok")

if [[ "$QUICK" != 1 ]]; then
  step "gcc: ASan + UBSan (build-asan/)"
  ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}" \
  UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
    build_and_test build-asan yes -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_SANITIZE=asan \
      -DCMAKE_C_COMPILER=gcc -DCMAKE_CXX_COMPILER=g++
  summary+=("gcc ASan+UBSan + ctest: ok")

  step "clang-14: -Wthread-safety -Werror build (build-clang/)"
  build_and_test build-clang no -DCMAKE_BUILD_TYPE=RelWithDebInfo -DQCOWFS_THREAD_SAFETY=ON \
    -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14
  summary+=("clang-14 thread-safety build: ok")
else
  summary+=("ASan/UBSan and clang thread-safety passes skipped (QCOWFS_QUICK=1)")
fi

step "summary"
for s in "${summary[@]}"; do echo "  $s"; done
echo "ALL PASSED"
