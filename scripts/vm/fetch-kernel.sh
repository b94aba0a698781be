#!/usr/bin/env bash
# Fetches a Debian kernel (vmlinuz + module tree) into the VM cache, for scripts/vm/run.sh.
#
# Usage: scripts/vm/fetch-kernel.sh NAME
#   NAME: trixie     Debian 13 kernel (6.12): has ublk_drv, nbd, loop
#         backports  newest trixie-backports kernel (7.x, split linux-binary-* + linux-modules-*)
#         bookworm   Debian 12 kernel (6.1): nbd and loop, no ublk (the fallback case)
#
# Result, under ${TORUS_VM_CACHE:-$HOME/.cache/torus-vm}/NAME/:
#   vmlinuz                      the kernel image
#   version                      the kernel release (uname -r), one line
#   modules/lib/modules/VERSION  the module tree, depmod'ed: modprobe -d .../modules -S VERSION MOD
#   .complete                    written last; its presence means the cache is whole
#
# Invariants:
#   - A second run with .complete present does no network and changes nothing.
#   - The system's apt state is never touched: the sources list is a temporary copy of
#     /etc/apt/sources.list.d/debian.sources with only its Suites: lines changed, and lists,
#     caches and downloads live under the cache directory.
#   - No registry host name is written in this file: they come from the system's sources.
set -euo pipefail

die() {
	echo "fetch-kernel.sh: $*" >&2
	exit 1
}

[ $# -eq 1 ] || die "usage: fetch-kernel.sh trixie|backports|bookworm"
name=$1
cache=${TORUS_VM_CACHE:-$HOME/.cache/torus-vm}
dest=$cache/$name

# main: suites replacing the main archive's; sec: the security archive's; release: apt's
# default release, so that the metapackage resolves to that suite's kernel.
case "$name" in
trixie) main="trixie trixie-updates" sec="trixie-security" release="" ;;
backports) main="trixie trixie-backports" sec="trixie-security" release="trixie-backports" ;;
bookworm) main="bookworm bookworm-updates" sec="bookworm-security" release="" ;;
*) die "unknown kernel '$name' (want trixie, backports or bookworm)" ;;
esac

if [ -f "$dest/.complete" ]; then
	echo "fetch-kernel.sh: $name: cached, kernel $(cat "$dest/version") in $dest" >&2
	exit 0
fi

for tool in apt-get apt-cache dpkg-deb depmod; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool not found (install apt, dpkg and kmod)"
done
src=/etc/apt/sources.list.d/debian.sources
[ -r "$src" ] || die "$src not readable: cannot derive a sources list"

work=$dest.tmp
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/debs" "$work/root"
trap 'rm -rf "$work"' EXIT

# Derive the temporary sources list: same URIs, keys and components; only Suites: changes.
awk -v main="$main" -v sec="$sec" '
	/^Suites:/ { if ($0 ~ /-security/) print "Suites: " sec; else print "Suites: " main; next }
	{ print }
' "$src" >"$work/apt/sources.sources"

apt_opts=(
	-o "Dir::Etc::sourcelist=$work/apt/sources.sources"
	-o "Dir::Etc::sourceparts=-"
	-o "Dir::State::Lists=$work/apt/lists"
	-o "Dir::Cache=$work/apt/cache"
)
[ -n "$release" ] && apt_opts+=(-o "APT::Default-Release=$release")

echo "fetch-kernel.sh: $name: updating package lists ($main $sec)" >&2
apt-get "${apt_opts[@]}" -qq update >"$work/update.log" 2>&1 ||
	{ cat "$work/update.log" >&2; die "$name: apt-get update failed against the temporary sources list"; }
# apt-get update exits 0 when it cannot reach an archive: check that it got package lists.
if ! compgen -G "$work/apt/lists/*_Packages*" >/dev/null; then
	cat "$work/update.log" >&2
	die "$name: could not download package lists for $main (no network to the archive?)"
fi

# Walk the metapackage's dependencies to the concrete kernel packages: names carrying a
# version (linux-image-6.12.x+deb13-amd64, linux-binary-7.x..., linux-modules-7.x..., linux-base-7.x...).
declare -A seen=()
queue=(linux-image-amd64)
pkgs=()
while [ ${#queue[@]} -gt 0 ]; do
	p=${queue[0]}
	queue=("${queue[@]:1}")
	[ -n "${seen[$p]:-}" ] && continue
	seen[$p]=1
	deps=$(apt-cache "${apt_opts[@]}" depends --no-recommends --no-suggests --no-conflicts \
		--no-breaks --no-replaces --no-enhances "$p" 2>/dev/null |
		awk '$1 ~ /Depends:/ { print $2 }' | grep -E '^linux-(image|binary|modules|base)-' || true)
	for d in $deps; do
		[ -n "${seen[$d]:-}" ] || queue+=("$d")
	done
	case "$p" in
	linux-image-[0-9]* | linux-binary-[0-9]* | linux-binary-unsigned-[0-9]* | linux-modules-[0-9]* | linux-base-[0-9]*)
		pkgs+=("$p")
		;;
	esac
done
[ ${#pkgs[@]} -gt 0 ] || die "$name: no kernel package found behind linux-image-amd64 in $main"

echo "fetch-kernel.sh: $name: downloading ${pkgs[*]}" >&2
(cd "$work/debs" && apt-get "${apt_opts[@]}" -o APT::Sandbox::User=root -qq download "${pkgs[@]}") >"$work/download.log" 2>&1 ||
	{ cat "$work/download.log" >&2; die "$name: apt-get download ${pkgs[*]} failed"; }

for deb in "$work"/debs/*.deb; do
	dpkg-deb -x "$deb" "$work/root"
done

# Kernel image: boot/vmlinuz-VERSION (6.1, 6.12) or usr/lib/modules/VERSION/vmlinuz (7.x split packages).
vmlinuz=$(find "$work/root" -type f \( -name 'vmlinuz-*' -o -path '*/lib/modules/*/vmlinuz' \) | head -n 1)
[ -n "$vmlinuz" ] || die "$name: no vmlinuz in ${pkgs[*]}"
case "$vmlinuz" in
*/vmlinuz-*) version=${vmlinuz##*/vmlinuz-} ;;
*) version=$(basename "$(dirname "$vmlinuz")") ;;
esac
moddir=$(find "$work/root" -type d -path "*/lib/modules/$version" | head -n 1)
[ -n "$moddir" ] || die "$name: no lib/modules/$version in ${pkgs[*]}"

rm -rf "$dest"
mkdir -p "$dest/modules/lib/modules"
mv "$vmlinuz" "$dest/vmlinuz"
mv "$moddir" "$dest/modules/lib/modules/$version"
echo "$version" >"$dest/version"
depmod -b "$dest/modules" "$version" || die "$name: depmod -b $dest/modules $version failed"
touch "$dest/.complete"
echo "fetch-kernel.sh: $name: kernel $version in $dest" >&2
