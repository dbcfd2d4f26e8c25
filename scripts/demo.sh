#!/usr/bin/env bash
# Demo for a fresh Debian 12 machine (run as root): installs the dependencies, builds
# qcowfs, creates an image and shows it.
#   bash scripts/demo.sh [IMAGE]     (default IMAGE: /tmp/qcowfs-demo.qcow2, recreated)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y build-essential cmake pkg-config libfuse3-dev fuse3 \
    libboost-program-options-dev nlohmann-json3-dev doctest-dev zlib1g-dev libzstd-dev \
    qemu-utils clang-14 libclang-rt-14-dev e2fsprogs
else
  echo "demo: not root (or no apt-get): assuming the dependencies are installed" >&2
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$(nproc)" --target qcowfs

image="${1:-}"
if [[ -z "$image" ]]; then
  image=/tmp/qcowfs-demo.qcow2
  rm -f "$image"
  echo "+ ./build/qcowfs create $image 1G"
  ./build/qcowfs create "$image" 1G
fi
echo "+ ./build/qcowfs info $image"
./build/qcowfs info "$image"
echo "+ qemu-img check $image"
qemu-img check "$image"
