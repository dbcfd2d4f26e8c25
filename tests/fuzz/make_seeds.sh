#!/usr/bin/env bash
# Seed corpus for fuzz_image: small qcow2 images made by qemu-img / qemu-io with every
# creation option we support, written into DIR (generated at CI time, never committed).
#   bash tests/fuzz/make_seeds.sh DIR
# Needs qemu-img and qemu-io. Images are 0.5-4 MiB virtual (one 64 MiB sparse one); the
# files stay under 1 MiB (libFuzzer's default -max_len truncates longer seeds) except the
# 2 MiB-cluster ones (6 and 12 MiB), which tests/run_all.sh replays whole before fuzzing.
set -euo pipefail

out="${1:?usage: make_seeds.sh DIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the images are made in a scratch directory
for tool in qemu-img qemu-io; do
  command -v "$tool" >/dev/null || { echo "make_seeds.sh: $tool not found" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

n=0
# make NAME SIZE -o OPTIONS...: create NAME (relative to $work), later copied to $out.
create() {
  local name="$1" size="$2"
  shift 2
  qemu-img create -q -f qcow2 "$@" "$name" "$size"
}
# io NAME CMD...: run qemu-io commands on NAME (each CMD one -c).
io() {
  local name="$1" args=()
  shift
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f qcow2 "${args[@]}" "$name" >/dev/null
}
keep() {
  cp "$1" "$out/$1"
  n=$((n + 1))
}
# A typical mix of writes: data, a zeroed range, a discard, unaligned writes.
scribble() {
  local name="$1" cs="$2"
  io "$name" "write -P 0xab 0 $cs" "write -P 0xcd $((3 * cs)) $((2 * cs))" \
    "write -P 0x11 $((cs / 2 + 7)) 1000" "write -z $((8 * cs)) $((2 * cs))" \
    "write -P 0x22 $((10 * cs)) $cs" "discard $((10 * cs)) $cs" "write -P 0x33 1M 4k"
}

# Cluster sizes, empty and written.
for cs in 512 4k 64k 2M; do
  create "cs-$cs-empty.qcow2" 1M -o cluster_size=$cs
  keep "cs-$cs-empty.qcow2"
done
for cs in 512 4096 65536; do
  create "cs-$cs-data.qcow2" 2M -o cluster_size=$cs
  scribble "cs-$cs-data.qcow2" $cs
  keep "cs-$cs-data.qcow2"
done
create cs-2M-data.qcow2 4M -o cluster_size=2M
io cs-2M-data.qcow2 "write -P 0xab 0 64k" "write -z 3M 512k" "write -P 0xcd 3M 4k"
keep cs-2M-data.qcow2

# Refcount widths.
for bits in 1 2 4 8 16 32 64; do
  create "refbits-$bits.qcow2" 2M -o cluster_size=4k,refcount_bits=$bits
  scribble "refbits-$bits.qcow2" 4096
  keep "refbits-$bits.qcow2"
done

# Version 2 (compat=0.10): no zero flag, no feature tables.
create v2-empty.qcow2 1M -o compat=0.10,cluster_size=4k
keep v2-empty.qcow2
create v2-data.qcow2 2M -o compat=0.10,cluster_size=4k
scribble v2-data.qcow2 4096
keep v2-data.qcow2

# Lazy refcounts, cleanly closed and left dirty (qemu-io's abort skips the close).
create lazy.qcow2 2M -o lazy_refcounts=on,cluster_size=4k
scribble lazy.qcow2 4096
keep lazy.qcow2
create lazy-dirty.qcow2 2M -o lazy_refcounts=on,cluster_size=4k
# (In a child shell, so its "Aborted" notice goes to /dev/null too.)
bash -c 'qemu-io -f qcow2 -c "write -P 0x44 0 64k" -c "write -P 0x55 1M 8k" -c abort \
  lazy-dirty.qcow2; true' >/dev/null 2>&1
keep lazy-dirty.qcow2

# Extended L2 entries (subclusters; cluster size >= 16K).
for cs in 16k 64k; do
  create "extl2-$cs.qcow2" 2M -o extended_l2=on,cluster_size=$cs
  io "extl2-$cs.qcow2" "write -P 0xab 0 4k" "write -P 0xcd 70k 3k" "write -z 128k 8k" \
    "write -P 0x11 256k 64k" "discard 260k 16k"
  keep "extl2-$cs.qcow2"
done

# Backing files (the fuzzer gives the image an in-memory backing device instead).
qemu-img create -q -f raw base.raw 2M
qemu-io -f raw -c "write -P 0x77 0 2M" base.raw >/dev/null
create backing-raw.qcow2 2M -o cluster_size=4k,backing_file=base.raw,backing_fmt=raw
io backing-raw.qcow2 "write -P 0xab 4k 4k" "write -P 0xcd 9000 100" "write -z 64k 8k"
keep backing-raw.qcow2
create base.qcow2 2M -o cluster_size=4k
io base.qcow2 "write -P 0x66 0 1M"
create backing-qcow2.qcow2 2M -o cluster_size=4k,backing_file=base.qcow2,backing_fmt=qcow2
io backing-qcow2.qcow2 "write -P 0xab 0 4k" "discard 8k 8k" "write -P 0x12 12345 20000"
keep backing-qcow2.qcow2
create backing-v2.qcow2 2M -o compat=0.10,cluster_size=4k,backing_file=base.qcow2,backing_fmt=qcow2
io backing-v2.qcow2 "write -P 0xab 0 4k" "write -z 8k 8k"
keep backing-v2.qcow2
create backing-extl2.qcow2 2M -o extended_l2=on,cluster_size=64k,backing_file=base.qcow2,backing_fmt=qcow2
io backing-extl2.qcow2 "write -P 0xab 2k 2k" "write -z 80k 4k"
keep backing-extl2.qcow2

# External data files (plain and raw).
create datafile.qcow2 2M -o cluster_size=4k,data_file=datafile.data
io datafile.qcow2 "write -P 0xab 0 8k" "write -z 64k 4k"
keep datafile.qcow2
create datafile-raw.qcow2 2M -o cluster_size=4k,data_file=datafile-raw.data,data_file_raw=on
io datafile-raw.qcow2 "write -P 0xab 0 8k"
keep datafile-raw.qcow2

# Compressed clusters, zlib and zstd, at several cluster sizes.
qemu-img create -q -f raw src.raw 2M
qemu-io -f raw -c "write -P 0x5a 0 256k" -c "write -P 0x00 256k 64k" -c "write -P 0xa5 1M 512k" \
  src.raw >/dev/null
for cs in 4k 64k; do
  for ct in zlib zstd; do
    qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=$cs,compression_type=$ct \
      src.raw "compressed-$ct-$cs.qcow2"
    keep "compressed-$ct-$cs.qcow2"
  done
done
# Compressed, then partly overwritten (the overwrite reallocates).
cp compressed-zlib-4k.qcow2 compressed-rewritten.qcow2
io compressed-rewritten.qcow2 "write -P 0x99 4k 6k" "discard 64k 8k" "write -z 1M 4k"
keep compressed-rewritten.qcow2

# Internal snapshots (shared clusters, refcount > 1).
create snapshot.qcow2 2M -o cluster_size=4k
io snapshot.qcow2 "write -P 0xab 0 64k"
qemu-img snapshot -c snap1 snapshot.qcow2
io snapshot.qcow2 "write -P 0xcd 4k 8k" "discard 32k 8k"
qemu-img snapshot -c snap2 snapshot.qcow2
io snapshot.qcow2 "write -P 0xef 0 4k"
keep snapshot.qcow2

# Preallocation modes.
for p in metadata falloc full; do
  create "prealloc-$p.qcow2" 512k -o cluster_size=4k,preallocation=$p
  keep "prealloc-$p.qcow2"
done

# A persistent dirty bitmap (autoclear bit, bitmap directory).
create bitmap.qcow2 2M -o cluster_size=4k
qemu-img bitmap --add bitmap.qcow2 b0
io bitmap.qcow2 "write -P 0xab 0 4k"
keep bitmap.qcow2

# Larger virtual size (sparse; L1 spans several clusters at 512-byte clusters).
create big-512.qcow2 64M -o cluster_size=512
io big-512.qcow2 "write -P 0xab 0 4k" "write -P 0xcd 63M 4k"
keep big-512.qcow2

echo "make_seeds.sh: $n images in $out"
