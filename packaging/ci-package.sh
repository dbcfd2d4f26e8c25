#!/usr/bin/env bash
# CI's package step (tests/run_all.sh runs it; run as root on a Debian 12 machine where
# qcowfs is not installed): build the .deb without the test suite, lint it, install it with
# apt-get, smoke-test the installed files (mount -t fuse.qcowfs, write, qcowfs status,
# unmount, qemu-img check; mount -a from an fstab; systemd's fstab generator; READY=1 and
# STOPPING=1 to NOTIFY_SOCKET; systemd-analyze verify; the man page; bash completion),
# then purge it and check that no file of it is left. Cleans up after itself on any exit.
set -euo pipefail

cd "$(dirname "$0")/.."
die() {
  echo "ci-package.sh: FAILED: $*" >&2
  exit 1
}
[[ $(id -u) == 0 ]] || die "run as root (it installs and purges the package)"
if dpkg-query -W -f='${Status}' qcowfs 2>/dev/null | grep -q 'install ok installed'; then
  die "qcowfs is installed already; this script installs and purges it (apt-get purge qcowfs first)"
fi

version=$(sed -n 's/^project(qcowfs VERSION \([0-9][0-9.]*\).*/\1/p' CMakeLists.txt)
tmp=$(mktemp -d /tmp/qcowfs-pkg.XXXXXX)
daemon_pids=()
installed=0

cleanup() {
  local rc=$?
  set +e
  # Whatever is still mounted under $tmp, then the daemons and helpers we started.
  for mp in $(awk -v d="$tmp" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r); do
    umount "$mp" 2>/dev/null || umount -l "$mp"
  done
  for p in "${daemon_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  [[ $installed == 1 ]] && apt-get purge -y qcowfs >/dev/null 2>&1
  rm -rf "$tmp"
  [[ $rc == 0 ]] || echo "ci-package.sh: FAILED (exit $rc)" >&2
  exit $rc
}
trap cleanup EXIT

# wait_gone PID: the daemon exits once unmounted (it flushes and closes the image first).
wait_gone() {
  for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  die "daemon $1 still running 30 s after the unmount"
}
# daemon_pid MOUNTPOINT: the daemon's pid, from qcowfs status --json.
daemon_pid() {
  qcowfs status --json "$1" | sed -n 's/^ *"pid": \([0-9]*\),*$/\1/p'
}
fstype() { findmnt -n -o FSTYPE --mountpoint "$1" || true; }

echo "== build the package (nocheck: the product only)"
rm -f qcowfs_*.deb
DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}" bash packaging/build-deb.sh
debs=(qcowfs_"$version"_*.deb)
deb=${debs[0]}
[[ -f $deb ]] || die "no qcowfs_${version}_*.deb"
dpkg-deb -c "$deb"

echo "== lintian"
lintian --fail-on error --display-info "$deb" || die "lintian reports errors"

echo "== install"
installed=1
apt-get install -y "./$deb"
[[ $(command -v qcowfs) == /usr/bin/qcowfs ]] || die "qcowfs is not /usr/bin/qcowfs"
[[ $(qcowfs --version) == "qcowfs $version" ]] || die "qcowfs --version: $(qcowfs --version)"
dpkg -L qcowfs >"$tmp/files"

echo "== smoke: create, mount -t fuse.qcowfs, write, status, unmount, qemu-img check"
qcowfs create "$tmp/disk.qcow2" 64M
touch "$tmp/disk.raw"
mount -t fuse.qcowfs "$tmp/disk.qcow2" "$tmp/disk.raw" -o threads=2,cache_size=8M
[[ $(fstype "$tmp/disk.raw") == fuse.qcowfs ]] || die "mount -t fuse.qcowfs: nothing mounted"
pid=$(daemon_pid "$tmp/disk.raw")
daemon_pids+=("$pid")
head -c 3M /dev/urandom >"$tmp/data"
dd if="$tmp/data" of="$tmp/disk.raw" bs=1M conv=notrunc,fsync status=none
cmp -n 3145728 "$tmp/data" "$tmp/disk.raw" || die "the mounted file does not read back what was written"
qcowfs status "$tmp/disk.raw" | tee "$tmp/status"
grep -q 'disk.raw' "$tmp/status" || die "qcowfs status does not show the image"
umount "$tmp/disk.raw"
wait_gone "$pid"
qemu-img check "$tmp/disk.qcow2"
qemu-img compare -f raw -F qcow2 "$tmp/data" "$tmp/disk.qcow2"

echo "== fstab: mount -a (options as fstab and systemd pass them)"
mkdir "$tmp/dir"
printf '%s %s fuse.qcowfs defaults,ro,nofail,x-systemd.requires=%s 0 0\n' \
  "$tmp/disk.qcow2" "$tmp/dir" "$tmp" >"$tmp/fstab"
mount -a -T "$tmp/fstab"
[[ $(fstype "$tmp/dir") == fuse.qcowfs ]] || die "mount -a: nothing mounted on $tmp/dir"
pid=$(daemon_pid "$tmp/dir")
daemon_pids+=("$pid")
cmp -n 3145728 "$tmp/data" "$tmp/dir/disk.raw" || die "fstab mount: wrong data"
if dd if=/dev/zero of="$tmp/dir/disk.raw" bs=4k count=1 conv=notrunc status=none 2>/dev/null; then
  die "fstab mount: ro was not applied"
fi
umount "$tmp/dir"
wait_gone "$pid"

echo "== fstab: systemd-fstab-generator"
mkdir -p "$tmp/gen/normal" "$tmp/gen/early" "$tmp/gen/late"
SYSTEMD_FSTAB="$tmp/fstab" SYSTEMD_PROC_CMDLINE="" \
  /lib/systemd/system-generators/systemd-fstab-generator "$tmp/gen/normal" "$tmp/gen/early" "$tmp/gen/late"
unit=$(systemd-escape --path --suffix=mount "$tmp/dir")
grep -q '^Type=fuse.qcowfs$' "$tmp/gen/normal/$unit" || die "the fstab generator made no fuse.qcowfs unit"
grep -qFx "Requires=$(systemd-escape --path --suffix=mount "$tmp")" "$tmp/gen/normal/$unit" ||
  die "x-systemd.requires=$tmp did not become a Requires= on its mount in $unit"
cat "$tmp/gen/normal/$unit"

echo "== systemd: READY=1 and STOPPING=1 (the unit's ExecStart on a test config)"
mkdir "$tmp/vms"
printf '{"mountpoint": "%s", "images": [{"name": "vm.raw", "path": "%s"}], "threads": 2}\n' \
  "$tmp/vms" "$tmp/disk.qcow2" >"$tmp/vms.json"
exec_start=$(sed -n 's/^ExecStart=//p' /lib/systemd/system/qcowfs@.service)
[[ $exec_start == "/usr/bin/qcowfs mount --config /etc/qcowfs/%i.json --foreground" ]] ||
  die "unexpected ExecStart: $exec_start"
# A stand-in for systemd's notify socket: logs each datagram as one line.
perl -MSocket -e '
  socket(my $s, PF_UNIX, SOCK_DGRAM, 0) or die "socket: $!";
  bind($s, pack_sockaddr_un($ARGV[0])) or die "bind: $!";
  open(my $out, ">>", $ARGV[1]) or die; $out->autoflush(1);
  while (defined(recv($s, my $m, 4096, 0))) { $m =~ s/\n/ /g; print $out "$m\n"; }
' "$tmp/notify.sock" "$tmp/notify.log" &
daemon_pids+=($!)
listener=$!
for _ in $(seq 50); do [[ -S $tmp/notify.sock ]] && break; sleep 0.1; done
NOTIFY_SOCKET="$tmp/notify.sock" ${exec_start//\/etc\/qcowfs\/%i.json/$tmp/vms.json} &
pid=$!
daemon_pids+=("$pid")
for _ in $(seq 300); do grep -q 'READY=1' "$tmp/notify.log" 2>/dev/null && break; sleep 0.1; done
grep -q 'READY=1' "$tmp/notify.log" || die "no READY=1 within 30 s"
[[ $(fstype "$tmp/vms") == fuse.qcowfs ]] || die "READY=1 before the mount was live"
cmp -n 3145728 "$tmp/data" "$tmp/vms/vm.raw" || die "config mount: wrong data"
kill -TERM "$pid"   # what systemctl stop does
wait "$pid" || die "the daemon exited $? on SIGTERM"
grep -q 'STOPPING=1' "$tmp/notify.log" || die "no STOPPING=1 on a clean stop"
[[ -z $(fstype "$tmp/vms") ]] || die "still mounted after SIGTERM"
kill "$listener"
cat "$tmp/notify.log"
qemu-img check "$tmp/disk.qcow2"

echo "== systemd-analyze verify"
systemd-analyze verify /lib/systemd/system/qcowfs@.service

echo "== man page"
man_page=/usr/share/man/man1/qcowfs.1.gz
[[ -f $man_page ]] || die "$man_page missing"
mandoc -T lint -W error "$man_page" || die "mandoc -T lint: errors in $man_page"
MANPAGER=cat MANWIDTH=80 man qcowfs 2>/dev/null | grep -q 'qcowfs - show qcow2 disk images' ||
  die "man qcowfs does not show the page"

echo "== bash completion"
complete_words() {
  # shellcheck disable=SC1091
  bash -c 'source /usr/share/bash-completion/bash_completion
    COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
    __load_completion qcowfs || exit 1
    _qcowfs qcowfs "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf "%s\n" "${COMPREPLY[@]}"' _ "$@"
}
complete_words qcowfs mo | grep -qx mount || die "completion: qcowfs mo<Tab>"
complete_words qcowfs mirror co | grep -qx complete || die "completion: qcowfs mirror co<Tab>"
complete_words qcowfs mount --re | grep -qx -- --read-only || die "completion: qcowfs mount --re<Tab>"
complete_words qcowfs create --compat '' | grep -qx 0.10 || die "completion: --compat <Tab>"

echo "== purge"
apt-get purge -y qcowfs
installed=0
! dpkg-query -W -f='${Status}' qcowfs 2>/dev/null | grep -q 'ok installed' || die "still installed after purge"
left=()
while read -r f; do
  if [[ -e $f || -L $f ]] && { [[ ! -d $f ]] || [[ $f == *qcowfs* ]]; }; then left+=("$f"); fi
done <"$tmp/files"
[[ ${#left[@]} == 0 ]] || die "left after apt-get purge: ${left[*]}"
rm -f "$deb"
echo "ci-package.sh: package $deb built, installed, smoke-tested, linted and purged: ok"
