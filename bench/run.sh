#!/usr/bin/env bash
# qcowfs benchmark: the same qcow2 image through qcowfs and through qemu-storage-daemon's FUSE
# export, and a raw copy without FUSE, driven by fio. See bench/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bench/run.sh [OPTIONS]

Mounts one pre-filled qcow2 image with qcowfs and with qemu-storage-daemon's FUSE export
(one after the other), runs the same fio workloads through each and on a raw copy without
FUSE, and prints markdown tables of medians with the ratio qcowfs / qemu-storage-daemon.
Every qcow2 image is checked with `qemu-img check` after each use; a failed check fails the
run. Progress goes to stderr, the report to stdout (`bench/run.sh > report.md`).

Workloads (psync, iodepth 1 per job, O_DIRECT on the FUSE files):
  seq-read-1M, seq-write-1M, rand-read-4k (1 and 4 jobs), rand-rewrite-4k (4 jobs),
  rand-rw-70/30-4k (4 jobs), first-touch-64k (random 64k writes on a fresh empty image);
  names: seq-read-1M seq-write-1M rand-read-4k-1j rand-read-4k-4j rand-rewrite-4k-4j
  rand-rw70-4k-4j first-touch-64k.

Options:
  --size SIZE          virtual size of the test image (default 1G; K/M/G/T suffixes)
  --runtime SEC        seconds per fio job (default 10)
  --repeat N           runs per workload and target; the table shows medians (default 3)
  --quick              smoke run: --size 256M --runtime 2 --repeat 1 (explicit options win)
  --workloads LIST     comma-separated subset of the workload names above (default: all)
  --cluster-size SIZE  qcow2 cluster size (default 64K)
  --threads N          qcowfs mount --threads N (default: qcowfs's own default)
  --poll-us N          qcowfs mount --poll-us N (default: qcowfs's own default; 0 turns
                       device polling off, for a before/after comparison)
  --transport LIST     FUSE transport(s) of qcowfs and the null export: auto, legacy or ring
                       (mount --transport). Several, comma-separated (e.g. legacy,ring):
                       each becomes its own target (qcowfs:legacy, qcowfs:ring, and with
                       --ceiling null:legacy, null:ring) and the report adds a table of
                       them side by side with ring/legacy ratios. ring needs the kernel's
                       /sys/module/fuse/parameters/enable_uring = Y (see README.md)
  --raw-direct         O_DIRECT on the raw copy too (default: buffered, see README)
  --cache MODE         writeback (default) or none: qcowfs mount --cache none against
                       qemu-storage-daemon with cache.direct=on on its file blockdev, and
                       the raw copy with fio --direct=1 (implies --raw-direct)
  --ceiling            add a fourth target, "null": qcowfs's FUSE server over a device that
                       does no I/O (qcowfs-null-export next to the qcowfs binary), the
                       limit of the FUSE transport on this machine
  --scale              also run the scale section: mount time and daemon RSS against
                       virtual size (fresh sparse images)
  --scale-only         run only the scale section
  --scale-sizes LIST   comma-separated virtual sizes for --scale (default 1G,1T,64T)
  --scale-writes N     random 4k writes spread over the image before reading RSS (default 100)
  --mirror             also run the mirror section (see bench/README.md): time to ready of a
                       qcowfs mirror job against qemu-storage-daemon's blockdev-mirror and
                       qemu-img convert (qcow2, raw and NBD targets); 4k random write IOPS
                       through the mount during a background and a write-blocking job; the
                       daemon's RSS during a job on a sparse source of --mirror-rss-size
  --mirror-only        run only the mirror section
  --mirror-parts LIST  comma-separated subset of the mirror section: ready (time to ready),
                       iops (guest IOPS under a job), rss (RSS on a sparse source);
                       default ready,iops,rss
  --mirror-kinds LIST  targets of the time-to-ready part: qcow2,raw,nbd (default: all)
  --mirror-rss-size S  virtual size of the sparse source for the RSS part (default 64T)
  --mirror-rss-secs N  seconds of RSS sampling per job that is not ready sooner (default 20)
  --workdir DIR        parent of the scratch directory (default /var/tmp); the scratch
                       directory (mktemp -d) is removed at the end unless --keep
  --keep               keep the scratch directory
  --qcowfs PATH        qcowfs binary (default: ../build/qcowfs relative to this script)
  -h, --help           show this help

Needs: fio, qemu-img, qemu-storage-daemon (Debian: qemu-system-common), fusermount3,
findmnt, python3, and /dev/fuse; --mirror also qemu-io, qemu-nbd (qemu-utils) and nbdkit;
run as root (or a user allowed to mount FUSE).
EOF
}

die() { echo "run.sh: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ORIG_ARGS=("$@")

opt_size="" opt_runtime="" opt_repeat="" quick=0
cluster=64K threads="" poll_us="" transports="" TRANSPORT="" raw_direct=0 cache_mode=writeback ceiling=0 do_main=1 do_scale=0
scale_sizes=1G,1T,64T scale_writes=100 workloads="" workdir_parent=/var/tmp keep=0
do_mirror=0 mirror_rss_size=64T mirror_rss_secs="" mirror_parts=ready,iops,rss mirror_kinds=qcow2,raw,nbd
qcowfs_bin="$SCRIPT_DIR/../build/qcowfs"

need_arg() { [[ $# -ge 2 && -n $2 ]] || { echo "run.sh: $1 needs a value" >&2; usage >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --size) need_arg "$@"; opt_size=$2; shift 2 ;;
    --runtime) need_arg "$@"; opt_runtime=$2; shift 2 ;;
    --repeat) need_arg "$@"; opt_repeat=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --workloads) need_arg "$@"; workloads=$2; shift 2 ;;
    --cluster-size) need_arg "$@"; cluster=$2; shift 2 ;;
    --threads) need_arg "$@"; threads=$2; shift 2 ;;
    --poll-us) need_arg "$@"; poll_us=$2; shift 2 ;;
    --transport) need_arg "$@"; transports=$2; shift 2 ;;
    --raw-direct) raw_direct=1; shift ;;
    --cache) need_arg "$@"; cache_mode=$2; shift 2 ;;
    --ceiling) ceiling=1; shift ;;
    --scale) do_scale=1; shift ;;
    --scale-only) do_scale=1; do_main=0; shift ;;
    --scale-sizes) need_arg "$@"; scale_sizes=$2; shift 2 ;;
    --scale-writes) need_arg "$@"; scale_writes=$2; shift 2 ;;
    --mirror) do_mirror=1; shift ;;
    --mirror-only) do_mirror=1; do_main=0; do_scale=0; shift ;;
    --mirror-parts) need_arg "$@"; mirror_parts=$2; shift 2 ;;
    --mirror-kinds) need_arg "$@"; mirror_kinds=$2; shift 2 ;;
    --mirror-rss-size) need_arg "$@"; mirror_rss_size=$2; shift 2 ;;
    --mirror-rss-secs) need_arg "$@"; mirror_rss_secs=$2; shift 2 ;;
    --workdir) need_arg "$@"; workdir_parent=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --qcowfs) need_arg "$@"; qcowfs_bin=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

case $cache_mode in
  writeback) qsd_cache="" ;;
  none) qsd_cache=",cache.direct=on"; raw_direct=1 ;;
  *) echo "run.sh: --cache must be writeback or none" >&2; exit 2 ;;
esac

if [[ $quick == 1 ]]; then
  size=${opt_size:-256M} runtime=${opt_runtime:-2} repeat=${opt_repeat:-1}
  mirror_rss_secs=${mirror_rss_secs:-5}
else
  size=${opt_size:-1G} runtime=${opt_runtime:-10} repeat=${opt_repeat:-3}
  mirror_rss_secs=${mirror_rss_secs:-20}
fi
[[ $mirror_rss_secs =~ ^[1-9][0-9]*$ ]] || die "--mirror-rss-secs must be a positive integer"
numfmt --from=iec "$mirror_rss_size" >/dev/null 2>&1 || die "bad --mirror-rss-size: $mirror_rss_size"
[[ ,$mirror_parts, =~ ^(,(ready|iops|rss))+,$ ]] || die "bad --mirror-parts: $mirror_parts (a list of ready, iops, rss)"
[[ ,$mirror_kinds, =~ ^(,(qcow2|raw|nbd))+,$ ]] || die "bad --mirror-kinds: $mirror_kinds (a list of qcow2, raw, nbd)"
[[ $runtime =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer"
[[ $repeat =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer"
[[ $scale_writes =~ ^[1-9][0-9]*$ ]] || die "--scale-writes must be a positive integer"
[[ -z $threads || $threads =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer"
[[ -z $poll_us || $poll_us =~ ^[0-9]+$ ]] || die "--poll-us must be a number"
IFS=, read -r -a transport_list <<<"$transports"
for t in "${transport_list[@]}"; do [[ $t =~ ^(auto|legacy|ring)$ ]] || die "--transport: $t is not auto, legacy or ring"; done
(( ${#transport_list[@]} != 1 )) || TRANSPORT=${transport_list[0]}
size_bytes=$(numfmt --from=iec "$size" 2>/dev/null) || die "bad --size: $size"
cluster_bytes=$(numfmt --from=iec "$cluster" 2>/dev/null) || die "bad --cluster-size: $cluster"
(( size_bytes >= 16 * 1048576 && size_bytes % 1048576 == 0 )) ||
  die "--size must be a multiple of 1M and at least 16M"
IFS=, read -r -a scale_list <<<"$scale_sizes"
for s in "${scale_list[@]}"; do numfmt --from=iec "$s" >/dev/null 2>&1 || die "bad --scale-sizes entry: $s"; done

for tool in fio qemu-img qemu-storage-daemon fusermount3 findmnt python3 numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install -y fio qemu-utils qemu-system-common fuse3 util-linux python3)"
done
[[ -x $qcowfs_bin ]] || die "qcowfs binary not found: $qcowfs_bin (build it: cmake --build build --target qcowfs)"
qcowfs_bin=$(cd "$(dirname "$qcowfs_bin")" && pwd)/$(basename "$qcowfs_bin")
null_bin=$(dirname "$qcowfs_bin")/qcowfs-null-export
[[ $ceiling == 0 || -x $null_bin ]] || die "--ceiling: $null_bin not found (cmake --build build --target qcowfs-null-export)"
[[ -e /dev/fuse ]] || die "/dev/fuse missing"
if [[ $do_mirror == 1 ]]; then
  for tool in qemu-io qemu-nbd nbdkit; do
    command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install -y qemu-utils nbdkit)"
  done
  (( size_bytes % (4 * 1048576) == 0 )) || die "--mirror: --size must be a multiple of 4M"
fi
[[ -d $workdir_parent ]] || die "--workdir $workdir_parent: not a directory"

WORK=$(mktemp -d "$workdir_parent/qcowfs-bench.XXXXXX")
WORK=$(cd "$WORK" && pwd)
RESULTS=$WORK/results.tsv
: >"$RESULTS"

# --- daemon bookkeeping: one mount at a time, tracked by PID only -------------------------

QCOWFS_PID="" QCOWFS_MP="" QSD_PID="" QSD_MP="" NULL_PID="" NULL_MP=""
NULL_PIDFILE=$WORK/null.pid
QCOWFS_SOCK=$WORK/qcowfs.sock
QSD_PIDFILE=$WORK/qsd.pid
LAST_MS=0 # duration of the last mount/unmount, in ms
NBD_PID="" NBD_COMM="" WATCH_PID="" # --mirror: the NBD server of a target, a status watcher

now_ns() { date +%s%N; }
is_mounted() { findmnt -n -M "$1" >/dev/null 2>&1; }
# A daemonized process is not our child; a zombie counts as gone (it has closed its files and
# released the image lock; some PID 1s reap late, e.g. ~1.5 s on the bench VMs).
pid_alive() {
  [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}
pid_is() { [[ -r /proc/$1/comm ]] && [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2"* ]]; }

# Waits up to $2 seconds for PID $1 (not our child) to exit.
wait_gone() {
  local pid=$1 deadline=$(( $(date +%s) + $2 ))
  while pid_alive "$pid"; do
    (( $(date +%s) < deadline )) || return 1
    sleep 0.01
  done
}

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

mount_qcowfs() { # IMAGE MOUNTPOINT
  local img=$1 mp=$2 t0 t1
  : >"$mp"
  QCOWFS_MP=$mp
  t0=$(now_ns)
  "$qcowfs_bin" mount --socket "$QCOWFS_SOCK" --cache "$cache_mode" ${threads:+--threads "$threads"} ${poll_us:+--poll-us "$poll_us"} \
    ${TRANSPORT:+--transport "$TRANSPORT"} "$img" "$mp" ||
    die "qcowfs mount $img failed"
  t1=$(now_ns)
  LAST_MS=$(( (t1 - t0) / 1000000 ))
  QCOWFS_PID=$("$qcowfs_bin" status --json --socket "$QCOWFS_SOCK" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])') ||
    die "qcowfs status failed"
  is_mounted "$mp" || die "qcowfs returned but $mp is not mounted"
}

umount_qcowfs() {
  local t0 t1
  t0=$(now_ns)
  if [[ -n $QCOWFS_MP ]] && is_mounted "$QCOWFS_MP"; then
    fusermount3 -u "$QCOWFS_MP" || die "fusermount3 -u $QCOWFS_MP failed"
  fi
  if [[ -n $QCOWFS_PID ]]; then
    # The daemon closes (flushes) the image after the unmount; qemu-img check must wait.
    wait_gone "$QCOWFS_PID" 120 || die "qcowfs (pid $QCOWFS_PID) did not exit after unmount"
  fi
  t1=$(now_ns)
  LAST_MS=$(( (t1 - t0) / 1000000 ))
  QCOWFS_PID="" QCOWFS_MP=""
}

mount_qsd() { # IMAGE MOUNTPOINT
  local img=${1//,/,,} mp=${2//,/,,} t0 t1
  : >"$2"
  QSD_MP=$2
  rm -f "$QSD_PIDFILE"
  t0=$(now_ns)
  # --daemonize: the parent exits once the export is live, like `qcowfs mount`.
  qemu-storage-daemon --daemonize --pidfile "$QSD_PIDFILE" \
    --blockdev "driver=file,node-name=file0,filename=$img,aio=threads$qsd_cache" \
    --blockdev "driver=qcow2,node-name=fmt0,file=file0,discard=unmap" \
    --export "type=fuse,id=exp0,node-name=fmt0,mountpoint=$mp,writable=on" \
    2>>"$WORK/qsd.log" || { cat "$WORK/qsd.log" >&2; die "qemu-storage-daemon failed on $1"; }
  t1=$(now_ns)
  LAST_MS=$(( (t1 - t0) / 1000000 ))
  [[ -s $QSD_PIDFILE ]] || die "qemu-storage-daemon wrote no pidfile"
  QSD_PID=$(<"$QSD_PIDFILE")
  is_mounted "$QSD_MP" || die "qemu-storage-daemon returned but $QSD_MP is not mounted"
}

umount_qsd() {
  local t0 t1
  t0=$(now_ns)
  if [[ -n $QSD_PID ]] && pid_is "$QSD_PID" qemu-storage; then
    kill "$QSD_PID" # SIGTERM: qsd unmounts, flushes and exits
    wait_gone "$QSD_PID" 120 || die "qemu-storage-daemon (pid $QSD_PID) did not exit"
  fi
  t1=$(now_ns)
  LAST_MS=$(( (t1 - t0) / 1000000 ))
  if [[ -n $QSD_MP ]] && is_mounted "$QSD_MP"; then fusermount3 -u "$QSD_MP" || true; fi
  QSD_PID="" QSD_MP=""
}

# The null export (--ceiling): the same FUSE server as qcowfs, no image behind it.
mount_null() { # (no image) MOUNTPOINT
  local mp=$2 i
  : >"$mp"
  NULL_MP=$mp
  rm -f "$NULL_PIDFILE"
  "$null_bin" "$size_bytes" "$mp" --pidfile "$NULL_PIDFILE" ${threads:+--threads "$threads"} \
    ${poll_us:+--poll-us "$poll_us"} ${TRANSPORT:+--transport "$TRANSPORT"} || die "qcowfs-null-export failed"
  # The detached child writes the pidfile right after the parent returns.
  for (( i = 0; i < 500; i++ )); do [[ -s $NULL_PIDFILE ]] && break; sleep 0.01; done
  [[ -s $NULL_PIDFILE ]] || die "qcowfs-null-export wrote no pidfile"
  NULL_PID=$(<"$NULL_PIDFILE")
  is_mounted "$mp" || die "qcowfs-null-export returned but $mp is not mounted"
}

umount_null() {
  if [[ -n $NULL_MP ]] && is_mounted "$NULL_MP"; then
    fusermount3 -u "$NULL_MP" || die "fusermount3 -u $NULL_MP failed"
  fi
  [[ -z $NULL_PID ]] || wait_gone "$NULL_PID" 30 || die "qcowfs-null-export (pid $NULL_PID) did not exit"
  NULL_PID="" NULL_MP=""
}

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $NULL_MP ]]; then
    is_mounted "$NULL_MP" && fusermount3 -u "$NULL_MP"
    if [[ -n $NULL_PID ]] && ! wait_gone "$NULL_PID" 10 && pid_is "$NULL_PID" qcowfs-null; then
      kill "$NULL_PID"; wait_gone "$NULL_PID" 10
    fi
  fi
  if [[ -n $QCOWFS_MP ]]; then
    is_mounted "$QCOWFS_MP" && fusermount3 -u "$QCOWFS_MP"
    if [[ -n $QCOWFS_PID ]] && ! wait_gone "$QCOWFS_PID" 30 && pid_is "$QCOWFS_PID" qcowfs; then
      kill "$QCOWFS_PID"; wait_gone "$QCOWFS_PID" 10
    fi
  fi
  if [[ -z $QSD_PID && -n $QSD_MP && -s $QSD_PIDFILE ]]; then QSD_PID=$(<"$QSD_PIDFILE"); fi
  if [[ -n $QSD_PID ]] && pid_is "$QSD_PID" qemu-storage; then
    kill "$QSD_PID"; wait_gone "$QSD_PID" 30 || kill -9 "$QSD_PID"
  fi
  [[ -n $QSD_MP ]] && is_mounted "$QSD_MP" && fusermount3 -u "$QSD_MP"
  if [[ -n $WATCH_PID ]]; then kill "$WATCH_PID" 2>/dev/null; wait "$WATCH_PID" 2>/dev/null; fi
  if [[ -n $NBD_PID ]] && pid_is "$NBD_PID" "$NBD_COMM"; then
    kill "$NBD_PID"; wait_gone "$NBD_PID" 30 || kill -9 "$NBD_PID"
  fi
  if [[ $keep == 1 ]]; then
    echo "run.sh: scratch directory kept: $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check_image() { # IMAGE LABEL
  local out rc=0
  out=$(qemu-img check "$1" 2>&1) || rc=$?
  log "qemu-img check ($2): rc=$rc: $(echo "$out" | head -1)"
  printf 'check\t%s\t%s\n' "$2" "$rc" >>"$WORK/checks.tsv"
  if [[ $rc != 0 ]]; then
    echo "$out" >&2
    die "qemu-img check failed on $1 after $2 (rc=$rc)"
  fi
}

# --- fio --------------------------------------------------------------------------------

# run_fio OUT.json FILE DIRECT fio-args...
# Dirty page cache left by the previous job (raw writes, the daemons' image writes) is written
# back first (syncfs), so that no job competes with an earlier job's writeback.
run_fio() {
  local out=$1 file=$2 direct=$3; shift 3
  sync -f "$WORK"
  fio --name=bench --filename="$file" --ioengine=psync --iodepth=1 --direct="$direct" \
    --invalidate=0 --fallocate=none --allow_file_create=0 --group_reporting \
    --output-format=json --output="$out" "$@" >/dev/null 2>"$out.err" ||
    { cat "$out.err" >&2; die "fio failed on $file ($*)"; }
}

# fio_value OUT.json UNIT -> MiB/s or IOPS (read + write)
fio_value() {
  python3 - "$1" "$2" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    j = json.load(f)
job = j["jobs"][0]
if job.get("error"):
    sys.exit("fio job error %s" % job["error"])
r, w = job["read"], job["write"]
if sys.argv[2] == "MiB/s":
    print("%.1f" % ((r["bw_bytes"] + w["bw_bytes"]) / 1048576))
else:
    print("%.0f" % (r["iops"] + w["iops"]))
PY
}

record() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$RESULTS"; }

# name|unit|fio args (the file, size and runtime are added)
WORKLOADS=(
  "seq-read-1M|MiB/s|--rw=read --bs=1M --numjobs=1"
  "seq-write-1M|MiB/s|--rw=write --bs=1M --numjobs=1"
  "rand-read-4k-1j|IOPS|--rw=randread --bs=4k --numjobs=1"
  "rand-read-4k-4j|IOPS|--rw=randread --bs=4k --numjobs=4"
  "rand-rewrite-4k-4j|IOPS|--rw=randwrite --bs=4k --numjobs=4"
  "rand-rw70-4k-4j|IOPS|--rw=randrw --rwmixread=70 --bs=4k --numjobs=4"
)
FIRST_TOUCH="first-touch-64k|MiB/s|--rw=randwrite --bs=64k --numjobs=1"
ALL_NAMES=" ${FIRST_TOUCH%%|*} "
for w in "${WORKLOADS[@]}"; do ALL_NAMES+="${w%%|*} "; done
IFS=, read -r -a wanted <<<"$workloads"
for n in "${wanted[@]}"; do [[ $ALL_NAMES == *" $n "* ]] || die "unknown workload: $n (one of:$ALL_NAMES)"; done
selected() { [[ -z $workloads || ",$workloads," == *",$1,"* ]]; }
any_rewrite=0 # any workload on the pre-filled image?
for w in "${WORKLOADS[@]}"; do selected "${w%%|*}" && any_rewrite=1; done

# All workloads in run order: the pre-filled-image ones, then first-touch (fresh image).
ALL_WORKLOADS=("${WORKLOADS[@]}" "$FIRST_TOUCH")

# the daemons read their image through the page cache (not with --cache none)
warm() { [[ $cache_mode == none ]] || cat "$1" >/dev/null; }

# run_one TARGET WORKLOAD REP: one fio job on one target. The daemons are mounted for this job
# alone and the image is checked right after, so the three targets of a workload run within a
# minute of each other: background load that drifts slowly skews the ratios less.
# first-touch-64k gets a fresh empty image (sparse raw file or new qcow2) and fio's random map
# (each 64k block once, random order), so every write lands on a never-written cluster; it
# stops when the image is full or after --runtime. The others run --runtime seconds each.
run_one() {
  local target=$1 w=$2 rep=$3 name unit args file direct=1 img="" v out mp=$WORK/mnt
  local -a timing=(--time_based --runtime="$runtime")
  IFS='|' read -r name unit args <<<"$w"
  # qcowfs:ring, null:legacy (--transport with several): the target on that transport.
  [[ $target == *:* ]] && TRANSPORT=${target#*:}
  local whole=$target
  target=${target%%:*}
  if [[ $target == null ]]; then
    [[ $name == first-touch-* ]] && timing=(--runtime="$runtime")
  elif [[ $name == first-touch-* ]]; then
    timing=(--runtime="$runtime")
    if [[ $target == raw ]]; then
      truncate -s "$size_bytes" "$WORK/ft.raw"
    else
      img=$WORK/ft.qcow2
      qemu-img create -q -f qcow2 -o cluster_size="$cluster_bytes" "$img" "$size_bytes"
    fi
  else
    if [[ $target == raw ]]; then warm "$WORK/base.raw"; else img=$WORK/base.qcow2; warm "$img"; fi
  fi
  if [[ $target == raw ]]; then
    direct=$raw_direct
    file=$WORK/base.raw
    [[ $name == first-touch-* ]] && file=$WORK/ft.raw
  else
    "mount_$target" "$img" "$mp"
    file=$mp
  fi
  out=$WORK/fio-${whole/:/-}-$name-$rep.json
  # shellcheck disable=SC2086
  run_fio "$out" "$file" "$direct" --size="$size_bytes" "${timing[@]}" $args
  v=$(fio_value "$out" "$unit")
  if [[ $target != raw ]]; then
    "umount_$target"
    [[ $target == null ]] || check_image "$img" "$target $name run $rep"
  fi
  rm -f "$WORK/ft.raw" "$WORK/ft.qcow2"
  record main "$name" "$unit" "$whole" "$rep" "$v"
  log "  $whole $name: $v $unit"
}

# --- scale: mount time and RSS against virtual size -------------------------------------

scale_target() { # TARGET SIZE REP
  local target=$1 vsize=$2 rep=$3 img=$WORK/scale.qcow2 mp=$WORK/mnt pid mount_ms rss0 rss1 out
  rm -f "$img"
  qemu-img create -q -f qcow2 -o cluster_size="$cluster_bytes" "$img" "$vsize"
  "mount_$target" "$img" "$mp"
  mount_ms=$LAST_MS
  if [[ $target == qcowfs ]]; then pid=$QCOWFS_PID; else pid=$QSD_PID; fi
  rss0=$(rss_kib "$pid")
  out=$WORK/scale-$target-$vsize-$rep.json
  # Same seed for both daemons: the same offsets, spread over the whole virtual size.
  run_fio "$out" "$mp" 1 --rw=randwrite --bs=4k --numjobs=1 --norandommap \
    --random_generator=tausworthe64 --randseed=4242 --number_ios="$scale_writes"
  rss1=$(rss_kib "$pid")
  "umount_$target"
  record scale "$vsize" mount_ms "$target" "$rep" "$mount_ms"
  record scale "$vsize" rss_mount_kib "$target" "$rep" "$rss0"
  record scale "$vsize" rss_after_kib "$target" "$rep" "$rss1"
  record scale "$vsize" umount_ms "$target" "$rep" "$LAST_MS"
  log "  $target $vsize: mount ${mount_ms} ms, VmRSS ${rss0} KiB after mount, ${rss1} KiB after $scale_writes writes, unmount ${LAST_MS} ms"
  check_image "$img" "$target scale $vsize run $rep"
  rm -f "$img"
}


# --- mirror: time to ready, IOPS under a job, RSS on a sparse source ---------------------

MIRROR_CTL=$SCRIPT_DIR/mirror_ctl.py
QMP_SOCK=$WORK/qmp.sock
NBD_SOCK=$WORK/nbd.sock
NBD_PIDFILE=$WORK/nbd.pid
NBD_URI="nbd+unix:///exp?socket=$NBD_SOCK"

# The mirror source: --size (1G) qcow2, 64K clusters: 1M of random data at every 4M (a
# quarter of the image), a 1M zero-flagged range (qemu-io write -z) 2M after every other data
# range (an eighth), the rest unallocated.
make_mirror_source() { # IMAGE
  local raw=$WORK/msrc.raw
  python3 - "$raw" "$size_bytes" <<'PY'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    f.truncate(size)
    for off in range(0, size, 4 << 20):
        f.seek(off)
        f.write(os.urandom(1 << 20))
PY
  qemu-img convert -f raw -O qcow2 -o cluster_size="$cluster_bytes" "$raw" "$1"
  rm -f "$raw"
  local -a zc=() off
  for (( off = 2 * 1048576; off < size_bytes; off += 8 * 1048576 )); do zc+=(-c "write -z $off 1M"); done
  qemu-io -f qcow2 "${zc[@]}" "$1" >/dev/null
  check_image "$1" "mirror source"
}

start_nbd() { # KIND(qemu-nbd|nbdkit-null) FILE-OR-SIZE
  rm -f "$NBD_SOCK" "$NBD_PIDFILE"
  if [[ $1 == qemu-nbd ]]; then
    NBD_COMM=qemu-nbd
    qemu-nbd --fork --pid-file="$NBD_PIDFILE" -f raw -t -k "$NBD_SOCK" -x exp --discard=unmap "$2" \
      2>>"$WORK/nbd.log" || { cat "$WORK/nbd.log" >&2; die "qemu-nbd failed"; }
  else
    NBD_COMM=nbdkit
    nbdkit -U "$NBD_SOCK" -P "$NBD_PIDFILE" -e exp null "$2" 2>>"$WORK/nbd.log" ||
      { cat "$WORK/nbd.log" >&2; die "nbdkit failed"; }
  fi
  local i
  for (( i = 0; i < 500; i++ )); do [[ -s $NBD_PIDFILE && -S $NBD_SOCK ]] && break; sleep 0.01; done
  [[ -s $NBD_PIDFILE ]] || die "$NBD_COMM wrote no pidfile"
  NBD_PID=$(<"$NBD_PIDFILE")
}

stop_nbd() {
  if [[ -n $NBD_PID ]] && pid_is "$NBD_PID" "$NBD_COMM"; then
    kill "$NBD_PID"
    wait_gone "$NBD_PID" 30 || die "$NBD_COMM (pid $NBD_PID) did not exit"
  fi
  NBD_PID=""
}

# qemu-storage-daemon with the source opened as node "src" and a QMP monitor, no export.
start_qsd_qmp() { # IMAGE
  local img=${1//,/,,}
  rm -f "$QSD_PIDFILE" "$QMP_SOCK"
  qemu-storage-daemon --daemonize --pidfile "$QSD_PIDFILE" \
    --blockdev "driver=file,node-name=srcfile,filename=$img,aio=threads$qsd_cache" \
    --blockdev "driver=qcow2,node-name=src,file=srcfile" \
    --chardev "socket,id=qmp0,path=$QMP_SOCK,server=on,wait=off" --monitor chardev=qmp0 \
    2>>"$WORK/qsd.log" || { cat "$WORK/qsd.log" >&2; die "qemu-storage-daemon failed on $1"; }
  [[ -s $QSD_PIDFILE ]] || die "qemu-storage-daemon wrote no pidfile"
  QSD_PID=$(<"$QSD_PIDFILE")
}

# Fails the run unless TARGET reads exactly like the source (holes read as zeros).
compare_images() { # SOURCE TARGET TARGET-FORMAT LABEL
  local out rc=0
  out=$(qemu-img compare -f qcow2 -F "$3" "$1" "$2" 2>&1) || rc=$?
  log "qemu-img compare ($4): rc=$rc: $out"
  printf 'compare\t%s\t%s\n' "$4" "$rc" >>"$WORK/checks.tsv"
  [[ $rc == 0 ]] || die "qemu-img compare: the target differs from the source after $4 (rc=$rc)"
}

# One time-to-ready run: TOOL (qcowfs|qemu|convert) copies the source to a fresh target of
# KIND (qcow2|raw|nbd), then the target is compared with the source and checked.
mirror_ready_one() { # TOOL KIND REP
  local tool=$1 kind=$2 rep=$3 src=$WORK/msrc.qcow2 tgt fmt r t bytes t_start=- cpu mp=$WORK/mnt
  case $kind in
    qcow2) tgt=$WORK/mtgt.qcow2 fmt=qcow2 ;;
    raw) tgt=$WORK/mtgt.raw fmt=raw ;;
    nbd) tgt=$WORK/mtgt-nbd.raw fmt=raw ;;
  esac
  rm -f "$tgt"
  if [[ $kind == nbd ]]; then truncate -s "$size_bytes" "$tgt"; start_nbd qemu-nbd "$tgt"; fi
  warm "$src"
  sync -f "$WORK"
  case $tool in
    qcowfs)
      mount_qcowfs "$src" "$mp"
      local job
      case $kind in
        qcow2) job="{\"id\": \"b\", \"target\": {\"path\": \"$tgt\", \"format\": \"qcow2\"}}" ;;
        raw) job="{\"id\": \"b\", \"target\": {\"path\": \"$tgt\", \"format\": \"raw\"}}" ;;
        nbd) job="{\"id\": \"b\", \"target\": {\"nbd\": \"$NBD_URI\"}}" ;;
      esac
      r=$(python3 "$MIRROR_CTL" qcowfs-ready "$QCOWFS_SOCK" "$job" 600 "$QCOWFS_PID") ||
        die "qcowfs mirror to $kind failed"
      read -r t bytes t_start cpu <<<"$r"
      # Stop with an exact copy: flushed and closed (SPEC §6 complete --no-pivot).
      python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-complete '{"id": "b", "pivot": false}' >/dev/null ||
        die "qcowfs mirror complete --no-pivot failed"
      umount_qcowfs
      ;;
    qemu)
      case $kind in
        qcow2) qemu-img create -q -f qcow2 -o cluster_size="$cluster_bytes" "$tgt" "$size_bytes" ;;
        raw) truncate -s "$size_bytes" "$tgt" ;;
      esac
      start_qsd_qmp "$src"
      if [[ $kind == nbd ]]; then
        r=$(BENCH_PID=$QSD_PID python3 "$MIRROR_CTL" qmp-mirror "$QMP_SOCK" nbd "$NBD_SOCK" exp 600) ||
          die "QEMU mirror to $kind failed"
      else
        r=$(BENCH_PID=$QSD_PID python3 "$MIRROR_CTL" qmp-mirror "$QMP_SOCK" "$kind" "$tgt" 600) ||
          die "QEMU mirror to $kind failed"
      fi
      read -r t bytes t_start cpu <<<"$r"
      umount_qsd
      ;;
    convert)
      case $kind in
        qcow2) r=$(python3 "$MIRROR_CTL" timed qemu-img convert -f qcow2 -O qcow2 -o cluster_size="$cluster_bytes" "$src" "$tgt") ;;
        raw) r=$(python3 "$MIRROR_CTL" timed qemu-img convert -f qcow2 -O raw "$src" "$tgt") ;;
        nbd) r=$(python3 "$MIRROR_CTL" timed qemu-img convert -n -f qcow2 -O raw "$src" "$NBD_URI") ;;
      esac || die "qemu-img convert to $kind failed"
      read -r t bytes t_start cpu <<<"$r"
      ;;
  esac
  [[ $kind == nbd ]] && stop_nbd
  compare_images "$src" "$tgt" "$fmt" "$tool mirror to $kind run $rep"
  [[ $kind == qcow2 ]] && check_image "$tgt" "$tool mirror target $kind run $rep"
  check_image "$src" "source after $tool to $kind run $rep"
  log "  $tool -> $kind: ready after $t s, CPU $cpu s ($bytes bytes done; start command replied or blockdev-mirror sent after $t_start s), target $(du -k "$tgt" | cut -f1) KiB on disk"
  record mready "$kind" s "$tool" "$rep" "$t"
  record mready_cpu "$kind" s "$tool" "$rep" "$cpu"
  rm -f "$tgt"
}

# 4k random writes (4 jobs, like rand-rewrite-4k-4j but over the whole mirror source: holes
# and zeros included, so writes first allocate) through the mount for --runtime seconds,
# without a job or while a job of MODE copies to a new qcow2 file. The job is started just
# before fio; a watcher records when it is first ready. After fio the job is completed
# without pivot (waiting for ready first) and the target compared with the source.
mirror_iops_one() { # MODE(none|background|write-blocking|write-blocking-ready) REP
  local mode=$1 rep=$2 img=$WORK/miops.qcow2 tgt=$WORK/miops-tgt.qcow2 mp=$WORK/mnt out v
  local watch=$WORK/watch.out state="-" when="-" r
  cp --sparse=always "$WORK/msrc.qcow2" "$img"
  rm -f "$tgt" "$watch"
  warm "$img"
  sync -f "$WORK"
  mount_qcowfs "$img" "$mp"
  if [[ $mode == write-blocking-ready ]]; then
    # The steady state: the job is ready before fio starts, every write goes through.
    python3 "$MIRROR_CTL" qcowfs-ready "$QCOWFS_SOCK" \
      "{\"id\": \"w\", \"mode\": \"write-blocking\", \"target\": {\"path\": \"$tgt\", \"format\": \"qcow2\"}}" 600 \
      >/dev/null || die "qcowfs mirror ($mode) failed"
  elif [[ $mode != none ]]; then
    # Starts the job 1 s after fio (in fio's 2 s ramp, not counted), then watches it until
    # ready or until fio ends (runtime + 1 s after the job's start).
    python3 "$MIRROR_CTL" qcowfs-watch "$QCOWFS_SOCK" \
      "{\"id\": \"w\", \"mode\": \"$mode\", \"target\": {\"path\": \"$tgt\", \"format\": \"qcow2\"}}" \
      "$watch" 1 "$(( runtime + 1 ))" &
    WATCH_PID=$!
  fi
  out=$WORK/fio-mirror-$mode-$rep.json
  run_fio "$out" "$mp" 1 --size="$size_bytes" --time_based --ramp_time=2 --runtime="$runtime" \
    --rw=randwrite --bs=4k --numjobs=4
  v=$(fio_value "$out" IOPS)
  if [[ $mode == write-blocking-ready ]]; then
    state=$(python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-status '{"id": "w"}' |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["state"])')
    [[ $state == ready ]] || die "mirror job ($mode) is $state after fio"
    python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-complete '{"id": "w", "pivot": false}' >/dev/null ||
      die "qcowfs mirror complete --no-pivot ($mode) failed"
  elif [[ $mode != none ]]; then
    wait "$WATCH_PID" || die "the mirror job ($mode) failed to start or failed: $(cat "$watch" 2>/dev/null)"
    WATCH_PID=""
    read -r state when <"$watch"
    [[ $state == ready || $state == running ]] || die "mirror job ($mode) under load ended $state"
    # Under load "ready" counts only if it came before fio ended.
    if [[ $state == ready ]] && awk -v w="$when" -v r="$(( runtime + 1 ))" 'BEGIN {exit !(w <= r)}'; then
      record miops_ready "$mode" s qcowfs "$rep" "$when"
    else
      record miops_ready "$mode" s qcowfs "$rep" -1
      state=running when="-"
    fi
    python3 "$MIRROR_CTL" qcowfs-ready-wait "$QCOWFS_SOCK" w 300 >/dev/null 2>&1 || true
    python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-complete '{"id": "w", "pivot": false}' >/dev/null ||
      die "qcowfs mirror complete --no-pivot ($mode) failed"
  fi
  umount_qcowfs
  check_image "$img" "mirror iops $mode run $rep"
  if [[ $mode != none ]]; then
    compare_images "$img" "$tgt" qcow2 "mirror iops $mode run $rep"
    check_image "$tgt" "mirror iops $mode target run $rep"
  fi
  record miops "$mode" IOPS qcowfs "$rep" "$v"
  log "  4k randwrite 4 jobs, job: $mode: $v IOPS; job ready within fio's runtime: $state (after $when s)"
  rm -f "$img" "$tgt"
}

# Peak VmRSS of the daemon while a job copies a sparse --mirror-rss-size source to KIND
# (nbd: nbdkit null of the same size, never known zero, so every byte is copied or zeroed;
# qcow2: a new file, known zero, only the allocated clusters are copied). Sampled every
# 20 ms until the job is ready or --mirror-rss-secs passed, then completed without pivot
# (ready) or cancelled. TOOL qemu: the same job in qemu-storage-daemon, for reference.
mirror_rss_one() { # TOOL KIND REP
  local tool=$1 kind=$2 rep=$3 img=$WORK/mrss.qcow2 mp=$WORK/mnt tgt=$WORK/mrss-tgt.qcow2 job pid
  local vbytes off step i rss0 res peak state secs done_b
  vbytes=$(numfmt --from=iec "$mirror_rss_size")
  rm -f "$img" "$tgt"
  qemu-img create -q -f qcow2 -o cluster_size="$cluster_bytes" "$img" "$vbytes"
  local -a wc=()
  step=$(( vbytes / 64 ))
  for (( i = 0; i < 64; i++ )); do
    off=$(( (i * step + (i * 1048576) % step) / 65536 * 65536 ))
    wc+=(-c "write -P $(( i + 1 )) $off 64k")
  done
  qemu-io -f qcow2 "${wc[@]}" "$img" >/dev/null
  [[ $kind == nbd ]] && start_nbd nbdkit-null "$vbytes"
  if [[ $tool == qcowfs ]]; then
    mount_qcowfs "$img" "$mp"
    pid=$QCOWFS_PID
    rss0=$(rss_kib "$pid")
    if [[ $kind == nbd ]]; then
      job="{\"id\": \"r\", \"target\": {\"nbd\": \"$NBD_URI\"}}"
    else
      job="{\"id\": \"r\", \"target\": {\"path\": \"$tgt\", \"format\": \"qcow2\"}}"
    fi
    res=$(python3 "$MIRROR_CTL" qcowfs-rss "$QCOWFS_SOCK" "$job" "$pid" "$mirror_rss_secs") ||
      die "qcowfs mirror on the $mirror_rss_size source to $kind failed"
    read -r peak state secs done_b <<<"$res"
    if [[ $state == ready ]]; then
      python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-complete '{"id": "r", "pivot": false}' >/dev/null ||
        die "qcowfs mirror complete --no-pivot failed"
    else
      python3 "$MIRROR_CTL" qcowfs-cmd "$QCOWFS_SOCK" mirror-cancel '{"id": "r"}' >/dev/null ||
        die "qcowfs mirror cancel failed"
    fi
    umount_qcowfs
  else
    [[ $kind == qcow2 ]] && qemu-img create -q -f qcow2 -o cluster_size="$cluster_bytes" "$tgt" "$vbytes"
    start_qsd_qmp "$img"
    pid=$QSD_PID
    rss0=$(rss_kib "$pid")
    if [[ $kind == nbd ]]; then
      res=$(python3 "$MIRROR_CTL" qmp-rss "$QMP_SOCK" "$pid" "$mirror_rss_secs" nbd "$NBD_SOCK" exp) ||
        die "QEMU mirror on the $mirror_rss_size source to $kind failed"
    else
      res=$(python3 "$MIRROR_CTL" qmp-rss "$QMP_SOCK" "$pid" "$mirror_rss_secs" qcow2 "$tgt") ||
        die "QEMU mirror on the $mirror_rss_size source to $kind failed"
    fi
    read -r peak state secs done_b <<<"$res"
    umount_qsd
  fi
  [[ $kind == nbd ]] && stop_nbd
  check_image "$img" "mirror rss $tool source run $rep"
  if [[ $kind == qcow2 ]]; then
    check_image "$tgt" "mirror rss $tool $kind target run $rep"
    [[ $tool != qcowfs || $state != ready ]] || compare_images "$img" "$tgt" qcow2 "mirror rss $tool $kind run $rep"
  fi
  record mrss "$kind" rss_peak_kib "$tool" "$rep" "$peak"
  record mrss "$kind" rss_mount_kib "$tool" "$rep" "$rss0"
  record mrss "$kind" secs "$tool" "$rep" "$secs"
  record mrss "$kind" bytes_done "$tool" "$rep" "$done_b"
  record mrss "$kind" ready "$tool" "$rep" "$([[ $state == ready ]] && echo 1 || echo 0)"
  log "  $tool: $mirror_rss_size source -> $kind: VmRSS ${rss0} KiB after open, peak ${peak} KiB during the job; job $state after $secs s, $done_b bytes done"
  rm -f "$img" "$tgt"
}

run_mirror() {
  local rep i tools=(qcowfs qemu convert) kinds modes=(none background write-blocking write-blocking-ready)
  IFS=, read -r -a kinds <<<"$mirror_kinds"
  log "mirror: source $size ($size_bytes bytes), cluster $cluster; parts $mirror_parts"
  make_mirror_source "$WORK/msrc.qcow2"
  for (( rep = 1; rep <= repeat; rep++ )); do
    [[ ,$mirror_parts, == *,ready,* ]] || break
    log "mirror time to ready, run $rep/$repeat"
    for kind in "${kinds[@]}"; do
      for (( i = 0; i < ${#tools[@]}; i++ )); do
        mirror_ready_one "${tools[$(( (i + rep - 1) % ${#tools[@]} ))]}" "$kind" "$rep"
      done
    done
  done
  for (( rep = 1; rep <= repeat; rep++ )); do
    [[ ,$mirror_parts, == *,iops,* ]] || break
    log "mirror IOPS under a job, run $rep/$repeat"
    for (( i = 0; i < ${#modes[@]}; i++ )); do
      mirror_iops_one "${modes[$(( (i + rep - 1) % ${#modes[@]} ))]}" "$rep"
    done
  done
  for (( rep = 1; rep <= repeat; rep++ )); do
    [[ ,$mirror_parts, == *,rss,* ]] || break
    log "mirror RSS on a $mirror_rss_size source, run $rep/$repeat"
    for kind in qcow2 nbd; do
      for tool in qcowfs qemu; do mirror_rss_one "$tool" "$kind" "$rep"; done
    done
  done
  rm -f "$WORK/msrc.qcow2"
}

# --- run --------------------------------------------------------------------------------

# Idle CPU share over one second, from /proc/stat: the numbers mean little on a busy machine.
idle_pct() {
  local a b
  read -r -a a < <(awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat)
  sleep 1
  read -r -a b < <(awk '/^cpu / {print $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat)
  echo $(( 100 * (b[0] - a[0]) / (b[1] - a[1] > 0 ? b[1] - a[1] : 1) ))
}
IDLE_START=$(idle_pct)
if (( IDLE_START < 90 )); then
  log "WARNING: the machine is busy before the start (${IDLE_START}% idle): results will be noisy"
fi
START=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
if [[ $do_main == 1 ]]; then
  log "scratch: $WORK; image $size ($size_bytes bytes), cluster $cluster, runtime ${runtime}s, repeat $repeat"
  if [[ $any_rewrite == 1 ]]; then
    log "pre-filling $WORK/base.raw from /dev/urandom"
    dd if=/dev/urandom of="$WORK/base.raw" bs=1M count=$(( size_bytes / 1048576 )) \
      iflag=fullblock status=none
    qemu-img convert -f raw -O qcow2 -o cluster_size="$cluster_bytes" "$WORK/base.raw" "$WORK/base.qcow2"
    check_image "$WORK/base.qcow2" "convert"
  fi
  targets=(raw qsd qcowfs)
  [[ $ceiling == 1 ]] && targets+=(null)
  if (( ${#transport_list[@]} > 1 )); then
    targets=(raw qsd)
    for t in "${transport_list[@]}"; do targets+=("qcowfs:$t"); done
    if [[ $ceiling == 1 ]]; then for t in "${transport_list[@]}"; do targets+=("null:$t"); done; fi
  fi
  for (( rep = 1; rep <= repeat; rep++ )); do
    log "run $rep/$repeat"
    for w in "${ALL_WORKLOADS[@]}"; do
      selected "${w%%|*}" || continue
      for (( i = 0; i < ${#targets[@]}; i++ )); do # rotate the target order from one repeat to the next
        run_one "${targets[$(( (i + rep - 1) % ${#targets[@]} ))]}" "$w" "$rep"
      done
    done
  done
fi
if [[ $do_scale == 1 ]]; then
  for vsize in "${scale_list[@]}"; do
    for (( rep = 1; rep <= repeat; rep++ )); do
      for t in qsd qcowfs; do
        log "scale $vsize run $rep/$repeat: $t"
        scale_target "$t" "$vsize" "$rep"
      done
    done
  done
fi
if [[ $do_mirror == 1 ]]; then
  run_mirror
fi
END=$(date +%s)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
IDLE_END=$(idle_pct)

# --- report -----------------------------------------------------------------------------

qemu_ver=$(qemu-storage-daemon --version | head -1)
git_rev=$(git -C "$SCRIPT_DIR/.." describe --always --dirty 2>/dev/null || echo unknown)
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
qcowfs_threads=${threads:-"default ($(nproc))"}${poll_us:+, poll-us: $poll_us}${transports:+, transport: $transports}
cat <<EOF
## qcowfs bench $(date -u +%Y-%m-%dT%H:%MZ)

- command: \`bench/run.sh ${ORIG_ARGS[*]}\`
- machine: $(nproc) vCPU, ${cpu:-unknown CPU}, $(awk '/^MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), kernel $(uname -r)
- $qemu_ver; $(fio --version); qcowfs $git_rev, binary built $(date -r "$qcowfs_bin" '+%F %T') (threads: $qcowfs_threads); cache mode: $cache_mode$( [[ $cache_mode == none ]] && echo " (qcowfs --cache none, qemu-storage-daemon cache.direct=on, raw fio --direct=1)" )
- $( [[ $do_main == 1 ]] && echo "image: $size, cluster $cluster; fio psync iodepth 1 per job, runtime ${runtime}s; raw copy $( [[ $raw_direct == 1 ]] && echo "O_DIRECT" || echo "buffered (page cache, like the daemons' own image I/O)"); " )medians of $repeat run(s)$( [[ $do_scale == 1 ]] && echo "; scale: cluster $cluster, $scale_writes random 4k writes (fixed seed) over each image" )
$( [[ $do_mirror == 1 ]] && echo "- mirror: source $size qcow2 (cluster $cluster): 1M of random data every 4M, 1M zero-flagged every 8M, the rest unallocated; job defaults (granularity = cluster size, buf_size 16M); IOPS: fio 4k randwrite, 4 jobs, ${runtime}s; RSS: $mirror_rss_size sparse source, 64 writes of 64k, sampled every 20 ms for up to ${mirror_rss_secs}s" )
- load average (1, 5, 15 min) at the start: $LOAD_START, at the end: $LOAD_END
- wall time: $(( (END - START) / 60 )) min $(( (END - START) % 60 )) s; CPU idle before/after: ${IDLE_START}% / ${IDLE_END}%$( (( IDLE_START < 90 || IDLE_END < 90 )) && echo " (**busy machine: noisy**)" ); qemu-img check: $(wc -l <"$WORK/checks.tsv" 2>/dev/null || echo 0) checks, all clean

EOF

python3 - "$RESULTS" <<'PY'
import sys, statistics
from collections import OrderedDict, defaultdict

rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
main = OrderedDict()
scale = OrderedDict()
for sec, name, unit, target, rep, val in rows:
    if sec not in ("main", "scale"):
        continue
    d = main if sec == "main" else scale
    d.setdefault((name, unit), defaultdict(list))[target].append(float(val))

def med(xs):
    return statistics.median(xs) if xs else None

def fmt(v, unit):
    if v is None:
        return "-"
    return "%.0f" % v if unit in ("IOPS", "mount_ms", "umount_ms") else "%.1f" % v

def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"

transports = [k.split(":", 1)[1] for k in dict.fromkeys(k for t in main.values() for k in t) if k.startswith("qcowfs:")]
if main and transports:
    # --transport with several: qcowfs and null on each transport, side by side.
    nulls = any(t["null:" + x] for t in main.values() for x in transports)
    cols = ["qcowfs:" + x for x in transports] + (["null:" + x for x in transports] if nulls else [])
    pair = "legacy" in transports and "ring" in transports
    head = ["raw", "qsd"] + cols
    if pair:
        head += ["qcowfs ring/legacy"] + (["null ring/legacy"] if nulls else [])
    print("### fio by FUSE transport (medians)\n")
    print("| workload | unit | " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * len(head))
    for (name, unit), t in main.items():
        vals = [fmt(med(t[k]), unit) for k in ["raw", "qsd"] + cols]
        if pair:
            vals.append("**%s**" % ratio(med(t["qcowfs:ring"]), med(t["qcowfs:legacy"])))
            if nulls:
                vals.append("**%s**" % ratio(med(t["null:ring"]), med(t["null:legacy"])))
        print("| %s | %s | %s |" % (name, unit, " | ".join(vals)))
    if nulls:
        # The ceiling per transport: a request pays that transport (null) and the image I/O
        # (raw) one after the other.
        print("\n### qcowfs against the limit 1/(1/null + 1/raw), per transport (medians)\n")
        head = []
        for x in transports:
            head += ["limit %s" % x, "**qcowfs:%s/limit**" % x]
        print("| workload | unit | " + " | ".join(head) + " |")
        print("|---|---|" + "---:|" * len(head))
        for (name, unit), t in main.items():
            vals = []
            for x in transports:
                n, r, c = med(t["null:" + x]), med(t["raw"]), med(t["qcowfs:" + x])
                lim = 1.0 / (1.0 / n + 1.0 / r) if n and r else None
                vals += [fmt(lim, unit), "**%s**" % ratio(c, lim)]
            print("| %s | %s | %s |" % (name, unit, " | ".join(vals)))
    print("\nAll runs (%s):\n" % " / ".join(["raw", "qsd"] + cols))
    for (name, unit), t in main.items():
        print("- %s: %s" % (name, " / ".join(", ".join(fmt(x, unit) for x in t[k]) for k in ["raw", "qsd"] + cols)))
    print()
elif main:
    ceiling = any(t["null"] for t in main.values())
    print("### fio (medians)\n")
    if ceiling:
        print("| workload | unit | raw | qsd | qcowfs | qcowfs/qsd | qcowfs/raw | null (no I/O) | null/qsd | qcowfs/null | limit 1/(1/null+1/raw) | **qcowfs/limit** |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    else:
        print("| workload | unit | raw | qsd | qcowfs | qcowfs/qsd | qcowfs/raw |")
        print("|---|---|---:|---:|---:|---:|---:|")
    for (name, unit), t in main.items():
        r, q, c, n = med(t["raw"]), med(t["qsd"]), med(t["qcowfs"]), med(t["null"])
        line = "| %s | %s | %s | %s | %s | **%s** | %s |" % (
            name, unit, fmt(r, unit), fmt(q, unit), fmt(c, unit), ratio(c, q), ratio(c, r))
        if ceiling:
            lim = 1.0 / (1.0 / n + 1.0 / r) if n and r else None
            line += " %s | %s | %s | %s | **%s** |" % (fmt(n, unit), ratio(n, q), ratio(c, n), fmt(lim, unit), ratio(c, lim))
        print(line)
    keys = ("raw", "qsd", "qcowfs", "null") if ceiling else ("raw", "qsd", "qcowfs")
    print("\nAll runs (%s):\n" % " / ".join(keys))
    for (name, unit), t in main.items():
        print("- %s: %s" % (name, " / ".join(", ".join(fmt(x, unit) for x in t[k]) for k in keys)))
    print()

mready = OrderedDict()
miops = OrderedDict()
mrss = OrderedDict()
for sec, name, unit, target, rep, val in rows:
    if sec == "mready":
        mready.setdefault(name, defaultdict(list))[target].append(float(val))
    elif sec == "mready_cpu":
        mready.setdefault(name, defaultdict(list))[target + "_cpu"].append(float(val))
    elif sec in ("miops", "miops_ready"):
        miops.setdefault(name, defaultdict(list))[sec].append(float(val))
    elif sec == "mrss":
        mrss.setdefault(name, defaultdict(list))[(unit, target)].append(float(val))

if mready:
    print("### mirror: time to ready (medians, seconds; lower is better)\n")
    print("| target | qcowfs mirror | QEMU blockdev-mirror | qemu-img convert | qcowfs speed / QEMU mirror | qcowfs speed / convert |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, t in mready.items():
        c, q, v = med(t["qcowfs"]), med(t["qemu"]), med(t["convert"])
        f = lambda x: "%.3f" % x if x is not None else "-"
        print("| %s | %s | %s | %s | **%s** | %s |" % (kind, f(c), f(q), f(v), ratio(q, c), ratio(v, c)))
    print("\nCPU seconds (user + system) of the copying process from the start command until ready (medians; for")
    print("qcowfs and QEMU the whole daemon, for convert the qemu-img process):\n")
    print("| target | qcowfs | QEMU | convert |")
    print("|---|---:|---:|---:|")
    for kind, t in mready.items():
        f = lambda x: "%.2f" % x if x is not None else "-"
        print("| %s | %s | %s | %s |" % (kind, f(med(t["qcowfs_cpu"])), f(med(t["qemu_cpu"])), f(med(t["convert_cpu"]))))
    print("\nAll runs, seconds to ready (qcowfs / QEMU / convert):\n")
    for kind, t in mready.items():
        print("- %s: %s" % (kind, " / ".join(", ".join("%.3f" % x for x in t[k]) for k in ("qcowfs", "qemu", "convert"))))
    print()

if miops:
    base = med(miops.get("none", {}).get("miops", []))
    print("### mirror: 4k random write IOPS through the mount (4 jobs) during a job (medians)\n")
    print("| job (to a new local qcow2 file) | IOPS | fraction of no job | ready before fio ended | time to ready under load (median s) |")
    print("|---|---:|---:|---|---:|")
    for mode, t in miops.items():
        v = med(t["miops"])
        rd = t.get("miops_ready", [])
        ok = [x for x in rd if x >= 0]
        if mode == "none":
            readycol = "-"
        elif mode == "write-blocking-ready":
            readycol = "ready before fio started, still ready after"
        else:
            readycol = "%d of %d runs" % (len(ok), len(rd))
        print("| %s | %s | **%s** | %s | %s |" % (mode, fmt(v, "IOPS"), ratio(v, base) if mode != "none" else "1.00",
              readycol, "%.2f" % med(ok) if ok else "-"))
    print("\nAll runs (IOPS): %s\n" % "; ".join("%s %s" % (m, ", ".join("%.0f" % x for x in t["miops"])) for m, t in miops.items()))

if mrss:
    print("### mirror: daemon VmRSS during a job on a sparse source (medians of the per-run peak)\n")
    print("Bound for qcowfs: metadata cache 32M + buf_size 16M + 16M = 64 MiB.\n")
    print("| target | daemon | VmRSS MiB after open | peak VmRSS MiB during the job | max over runs | within 64 MiB | job when sampling stopped | bytes done (median) |")
    print("|---|---|---:|---:|---:|---|---|---:|")
    for kind, t in mrss.items():
        for tool in ("qcowfs", "qemu"):
            if not t.get(("rss_peak_kib", tool)):
                continue
            g = lambda k: t[(k, tool)]
            r0, pk, mx = med(g("rss_mount_kib")), med(g("rss_peak_kib")), max(g("rss_peak_kib"))
            nready = sum(1 for x in g("ready") if x)
            n = len(g("ready"))
            state = ("ready after %.2f s (median)" % med(g("secs"))) if nready == n else \
                ("not ready in %d of %d runs (sampled %.0f s)" % (n - nready, n, med(g("secs"))))
            within = ("**yes**" if mx <= 64 * 1024 else "**no**") if tool == "qcowfs" else "-"
            print("| %s | %s | %.1f | %.1f | %.1f | %s | %s | %.0f MiB |" % (
                kind, "qcowfs" if tool == "qcowfs" else "qemu-storage-daemon", r0 / 1024, pk / 1024, mx / 1024,
                within, state, med(g("bytes_done")) / 1048576))
    print()

if scale:
    sizes = []
    for (vsize, _), _t in scale.items():
        if vsize not in sizes:
            sizes.append(vsize)
    def get(vsize, metric, target):
        return med(scale.get((vsize, metric), {}).get(target, []))
    print("### scale (medians): fresh sparse image, mount, random 4k writes spread over it\n")
    print("| virtual size | mount ms qsd | mount ms qcowfs | VmRSS MiB after mount qsd | qcowfs | VmRSS MiB after writes qsd | qcowfs | RSS qcowfs/qsd | unmount ms qsd | qcowfs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in sizes:
        mq, mc = get(s, "mount_ms", "qsd"), get(s, "mount_ms", "qcowfs")
        r0q, r0c = get(s, "rss_mount_kib", "qsd"), get(s, "rss_mount_kib", "qcowfs")
        r1q, r1c = get(s, "rss_after_kib", "qsd"), get(s, "rss_after_kib", "qcowfs")
        uq, uc = get(s, "umount_ms", "qsd"), get(s, "umount_ms", "qcowfs")
        mib = lambda k: "%.1f" % (k / 1024) if k is not None else "-"
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            s, fmt(mq, "mount_ms"), fmt(mc, "mount_ms"), mib(r0q), mib(r0c), mib(r1q), mib(r1c),
            ratio(r1c, r1q), fmt(uq, "umount_ms"), fmt(uc, "umount_ms")))
    print()
PY
log "done in $(( END - START )) s"
