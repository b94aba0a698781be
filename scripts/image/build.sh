#!/usr/bin/env bash
# make image: OCI image archives of torusd and torus-csi, built by buildah with no container daemon
# and no registry.
#
# Usage: scripts/image/build.sh [torusd] [torus-csi]   (default: both)
#
# Result, under ${IMAGE_OUT:-_out/images}/:
#   torusd.oci.tar     IMAGE_PREFIX/torusd:VERSION, from scratch: torusd (the entrypoint), torusctl, torusblk
#   torus-csi.oci.tar  IMAGE_PREFIX/torus-csi:VERSION, a Debian bookworm minbase root with the filesystem
#                      tools the node plugin runs, and torus-csi (the entrypoint), torusblk, torusctl
#   bin/               the static binaries (CGO_ENABLED=0) the images hold, in /usr/local/bin
#   VERSION            the images' tag: git describe --always --dirty
#   storage/           buildah's storage (working containers, the cached Debian base image)
# IMAGE_PREFIX defaults to torus-storage. Load an archive with `podman load -i FILE`, or copy it to a
# registry with `skopeo copy oci-archive:FILE docker://HOST/NAME:TAG`.
#
# Invariants:
#   - Nothing here talks to a container daemon or a registry, and the system's container storage is
#     not touched: buildah runs on storage/ and commits straight to the archives.
#   - The Debian root comes from mmdebstrap over a temporary copy of the system's debian.sources with
#     only its Suites: lines changed (no archive host name is written here). It is cached as a tarball
#     in ${TORUS_IMAGE_CACHE:-$HOME/.cache/torus-image}, keyed by a hash of everything that goes into
#     it (suite, packages, dpkg options, architecture, sources); a cached root is reused as it is, so
#     delete the cache to pick up Debian's updates.
#   - An image's creation time is the commit time of HEAD, so two builds of one commit differ only
#     where buildah itself is not reproducible.
set -euo pipefail
cd "$(dirname "$0")/../.."

die() {
	echo "image: $*" >&2
	exit 1
}

GO=${GO:-go}
out=${IMAGE_OUT:-_out/images}
prefix=${IMAGE_PREFIX:-torus-storage}
cache=${TORUS_IMAGE_CACHE:-$HOME/.cache/torus-image}
source_url=https://github.com/torus-storage/torus

images=("$@")
[ ${#images[@]} -gt 0 ] || images=(torusd torus-csi)
for img in "${images[@]}"; do
	case "$img" in
	torusd | torus-csi) ;;
	*) die "unknown image '$img' (want torusd or torus-csi)" ;;
	esac
done

for tool in git buildah; do
	command -v "$tool" >/dev/null 2>&1 || die "$tool not found (scripts/deps.sh image installs it)"
done

version=$(git describe --always --dirty)
revision=$(git rev-parse HEAD)
created=$(git log -1 --format=%ct HEAD)
mkdir -p "$out/bin"
echo "$version" >"$out/VERSION"

bah=(buildah --root "$PWD/$out/storage/root" --runroot "$PWD/$out/storage/run")
# Working containers left by an interrupted build.
"${bah[@]}" rm --all >/dev/null

echo "image: go build (static) torusd torusctl torusblk torus-csi into $out/bin" >&2
CGO_ENABLED=0 "$GO" build -trimpath -ldflags="-s -w -X main.version=$version" -o "$out/bin/" \
	./cmd/torusd ./cmd/torusctl ./cmd/torusblk ./cmd/torus-csi

# config CONTAINER TITLE DESCRIPTION ENTRYPOINT: what every image carries.
config() {
	"${bah[@]}" config \
		--entrypoint "[\"/usr/local/bin/$4\"]" --cmd '' \
		--env PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin \
		--workingdir / \
		--created-by "scripts/image/build.sh: $4 and its tools in /usr/local/bin" \
		--label "org.opencontainers.image.title=$2" \
		--label "org.opencontainers.image.description=$3" \
		--label "org.opencontainers.image.source=$source_url" \
		--label "org.opencontainers.image.version=$version" \
		--label "org.opencontainers.image.revision=$revision" \
		"$1"
}

# commit CONTAINER NAME: write $out/NAME.oci.tar holding $prefix/NAME:$version (gzip layers).
commit() {
	rm -f "$out/$2.oci.tar"
	"${bah[@]}" commit -q --rm --format oci --disable-compression=false --timestamp "$created" \
		"$1" "oci-archive:$out/$2.oci.tar:$prefix/$2:$version" >/dev/null
	echo "image: $out/$2.oci.tar: $prefix/$2:$version ($(du -h "$out/$2.oci.tar" | cut -f1))" >&2
}

# torusd: from scratch. The binaries are static and need no file of a distribution: the cluster's
# TLS is its own CA, etcd is reached by address. /tmp, /run (torusblk's run dir) and /var/lib/torus
# (the conventional data dir) exist so that nothing has to create them.
build_torusd() {
	local skel=$out/torusd-skel
	rm -rf "$skel"
	mkdir -p "$skel/tmp" "$skel/run" "$skel/var/lib/torus"
	chmod 1777 "$skel/tmp"
	tar --owner=0 --group=0 --numeric-owner --mtime="@$created" --sort=name -C "$skel" -cf "$skel.tar" .
	local c
	c=$("${bah[@]}" from --quiet scratch)
	"${bah[@]}" add --quiet "$c" "$skel.tar" / >/dev/null
	"${bah[@]}" copy --quiet --chmod 0755 "$c" "$out/bin/torusd" "$out/bin/torusctl" "$out/bin/torusblk" /usr/local/bin/ >/dev/null
	config "$c" torusd "Torus storage node (torusd), with torusctl and torusblk" torusd
	commit "$c" torusd
	rm -rf "$skel" "$skel.tar"
}

# The Debian root of torus-csi: what the node plugin runs besides torusblk (mkfs.ext4, mkfs.xfs, blkid,
# mount, umount, resize2fs, xfs_growfs), without documentation.
csi_suite=bookworm
csi_packages=e2fsprogs,xfsprogs,util-linux,mount
csi_dpkgopts=(
	'path-exclude=/usr/share/man/*'
	'path-exclude=/usr/share/info/*'
	'path-exclude=/usr/share/locale/*'
	'path-exclude=/usr/share/doc/*'
	'path-include=/usr/share/doc/*/copyright'
)

# csi_root: print the path of the cached root tarball, making it first if needed.
csi_root() {
	command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap not found (scripts/deps.sh image installs it)"
	local src=/etc/apt/sources.list.d/debian.sources
	[ -r "$src" ] || die "$src not readable: cannot derive a sources list for mmdebstrap"
	mkdir -p "$cache"
	local sources
	sources=$(awk -v suite="$csi_suite" '
		/^Suites:/ { if ($0 ~ /-security/) print "Suites: " suite "-security"; else print "Suites: " suite " " suite "-updates"; next }
		{ print }
	' "$src")
	local key
	key=$(printf '%s\n' "$csi_suite" minbase "$csi_packages" "${csi_dpkgopts[@]}" \
		"$(dpkg --print-architecture)" "$sources" | sha256sum | cut -c1-16)
	local root=$cache/csi-root-$csi_suite-$key.tar
	if [ ! -f "$root" ]; then
		echo "image: mmdebstrap $csi_suite minbase + $csi_packages (cached in $root)" >&2
		local tmp=$cache/tmp.$$
		rm -rf "$tmp"
		mkdir -p "$tmp"
		printf '%s\n' "$sources" >"$tmp/debian.sources"
		local opts=()
		for o in "${csi_dpkgopts[@]}"; do opts+=(--dpkgopt="$o"); done
		SOURCE_DATE_EPOCH=$created mmdebstrap --quiet --variant=minbase --include="$csi_packages" "${opts[@]}" \
			"$csi_suite" "$tmp/root.tar" "$tmp/debian.sources" >"$tmp/log" 2>&1 ||
			{ cat "$tmp/log" >&2; rm -rf "$tmp"; die "mmdebstrap $csi_suite failed"; }
		mv "$tmp/root.tar" "$root"
		rm -rf "$tmp"
	fi
	echo "$root"
}

# torus-csi: the Debian root as its own layer (committed once per root into buildah's storage, so
# that a rebuild only adds the binaries), then the binaries.
build_torus_csi() {
	local root base c
	root=$(csi_root)
	base=localhost/torus-build/csi-base:${root##*/csi-root-}
	base=${base%.tar}
	if ! "${bah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
		c=$("${bah[@]}" from --quiet scratch)
		"${bah[@]}" config --created-by "mmdebstrap --variant=minbase --include=$csi_packages $csi_suite" "$c"
		"${bah[@]}" add --quiet "$c" "$root" / >/dev/null
		"${bah[@]}" commit -q --rm --timestamp "$created" "$c" "$base" >/dev/null
	fi
	# Bases of other roots (an older package list or sources) are of no more use.
	local b
	for b in $("${bah[@]}" images --noheading --format '{{.Name}}:{{.Tag}}' --filter reference=localhost/torus-build/csi-base); do
		[ "$b" = "$base" ] || "${bah[@]}" rmi "$b" >/dev/null
	done
	c=$("${bah[@]}" from --quiet --pull=never "$base")
	"${bah[@]}" copy --quiet --chmod 0755 "$c" "$out/bin/torus-csi" "$out/bin/torusblk" "$out/bin/torusctl" /usr/local/bin/ >/dev/null
	config "$c" torus-csi "Torus CSI driver (torus-csi), with torusblk, torusctl and the ext4 and XFS tools" torus-csi
	commit "$c" torus-csi
}

for img in "${images[@]}"; do
	case "$img" in
	torusd) build_torusd ;;
	torus-csi) build_torus_csi ;;
	esac
done
