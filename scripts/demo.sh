#!/usr/bin/env bash
# Demo for a fresh Debian 12 machine (run as root): installs the dependencies, builds
# qcowfs, creates an image (unless one is given), mounts it as a raw file and leaves it
# mounted.
#   bash scripts/demo.sh [IMAGE]     (default IMAGE: /tmp/qcowfs-demo.qcow2, recreated)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y build-essential cmake pkg-config libfuse3-dev liburing-dev fuse3 \
    libboost-program-options-dev nlohmann-json3-dev doctest-dev zlib1g-dev libzstd-dev \
    libnbd-dev libsystemd-dev scdoc qemu-utils e2fsprogs
else
  echo "demo: not root (or no apt-get): assuming the dependencies are installed" >&2
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j"$(nproc)" --target qcowfs
q=./build/qcowfs
mp=/tmp/qcowfs-demo.raw

# A previous demo's mount is stopped first (its daemon flushes and exits).
if mountpoint -q "$mp" 2>/dev/null; then
  pid=$("$q" status --json "$mp" 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' | head -n1)
  fusermount3 -u "$mp"
  [[ -n "$pid" ]] && while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
fi

image="${1:-}"
if [[ -z "$image" ]]; then
  image=/tmp/qcowfs-demo.qcow2
  rm -f "$image"
  echo "+ $q create $image 1G"
  "$q" create "$image" 1G
fi
echo "+ $q info $image"
"$q" info "$image"

touch "$mp"
echo "+ $q mount $image $mp"
"$q" mount "$image" "$mp"
echo "+ dd if=/dev/urandom of=$mp bs=1M count=8 seek=16 conv=notrunc,fsync"
dd if=/dev/urandom of="$mp" bs=1M count=8 seek=16 conv=notrunc,fsync status=none
echo "+ ls -ls $mp"
ls -ls "$mp"
echo "+ $q status $mp"
"$q" status "$mp"
echo "+ qemu-img map -U $image"
qemu-img map -U "$image"
echo
echo "qcowfs is running: $mp is $image as a raw file."
echo "Stop it with: fusermount3 -u $mp"
