#!/usr/bin/env bash
# Builds the Debian package qcowfs_VERSION_ARCH.deb from this checkout into the repository
# root:
#   bash packaging/build-deb.sh && apt-get install ./qcowfs_*.deb
# The package is built in build-deb/ from a copy of the checkout (tracked and untracked
# files that git does not ignore; uncommitted changes included) with packaging/debian/ as
# debian/, by dpkg-buildpackage -us -uc -b. Run as root on a machine without the build
# dependencies, it installs them with apt-get first.
# Environment: DEB_BUILD_OPTIONS (nocheck: build the product only, no test suite; Debian's
# default otherwise builds and runs the unit tests), JOBS (default: the number of CPUs).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
die() {
  echo "build-deb.sh: $*" >&2
  exit 1
}

# One version: CMake's project(VERSION); debian/changelog must agree.
version=$(sed -n 's/^project(qcowfs VERSION \([0-9][0-9.]*\).*/\1/p' CMakeLists.txt)
[[ -n $version ]] || die "CMakeLists.txt: no project(qcowfs VERSION X.Y.Z) line"

if ! command -v dpkg-buildpackage >/dev/null || ! command -v dh >/dev/null; then
  [[ $(id -u) == 0 ]] || die "dpkg-dev and debhelper are missing (apt-get install dpkg-dev debhelper)"
  apt-get install -y --no-install-recommends dpkg-dev debhelper fakeroot
fi
changelog_version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
[[ $changelog_version == "$version" ]] ||
  die "packaging/debian/changelog is at $changelog_version but CMakeLists.txt project(VERSION) is $version; add a changelog entry for $version"

# The build dependencies (DEB_BUILD_PROFILES=nocheck drops the test-only ones).
profiles=${DEB_BUILD_PROFILES:-}
if [[ " ${DEB_BUILD_OPTIONS:-} " == *" nocheck "* && " $profiles " != *" nocheck "* ]]; then
  profiles="${profiles:+$profiles }nocheck"
fi
export DEB_BUILD_PROFILES=$profiles
if ! unmet=$(dpkg-checkbuilddeps packaging/debian/control 2>&1); then
  missing=$(sed -n 's/.*Unmet build dependencies: //p' <<<"$unmet" | sed 's/([^)]*)//g; s/|[^ ]*//g')
  [[ -n $missing ]] || die "$unmet"
  [[ $(id -u) == 0 ]] || die "missing build dependencies: $missing (apt-get install them, or run as root)"
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends $missing
fi

work=$root/build-deb
src=$work/qcowfs-$version
rm -rf "$work"
mkdir -p "$src"
if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$root" ls-files -z --cached --others --exclude-standard |
    (cd "$root" && tar --null --no-recursion --ignore-failed-read -cf - -T -) | tar -xf - -C "$src"
else
  tar --exclude='./build*' --exclude='./.git' --exclude='./qcowfs_*.deb' -cf - . | tar -xf - -C "$src"
fi
rm -rf "$src/debian"
cp -r packaging/debian "$src/debian"

(cd "$src" && dpkg-buildpackage -us -uc -b -J"${JOBS:-$(nproc)}")

arch=$(dpkg-architecture -qDEB_HOST_ARCH)
deb=qcowfs_${version}_${arch}.deb
[[ -f $work/$deb ]] || die "dpkg-buildpackage made no $deb"
rm -f "$root"/qcowfs_*.deb
mv "$work/$deb" "$root/$deb"
echo "built $root/$deb"
