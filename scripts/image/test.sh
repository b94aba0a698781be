#!/usr/bin/env bash
# make test-image: the images of scripts/image/build.sh run a cluster and serve a volume.
#
# Under podman, with host networking and storage of its own in a temporary directory:
#   1. `torusd dev` from the torusd image: embedded etcd and three storage nodes, data in a bind mount;
#   2. torusctl in that container creates a volume (replication 3);
#   3. `torusblk serve` from the torusd image exports it over NBD on a unix socket in the bind mount;
#      qemu-io writes a pattern and nbdcopy random data through it, and both read back;
#   4. that server is stopped (it must exit 0) and `torusblk serve` from the torus-csi image serves the
#      volume again: everything reads back, unwritten blocks read as zeroes;
#   5. the torus-csi image holds the node plugin's tools: mkfs.ext4 and mkfs.xfs make filesystems that
#      blkid recognises, resize2fs grows one, and mount, umount and xfs_growfs are there;
#   6. the cluster stops cleanly (exit 0).
# The containers run with podman's default seccomp profile plus the three io_uring system calls, which
# that profile refuses and the storage code needs: the test shows that nothing else must be relaxed.
#
# Needs root, podman, runc, jq, qemu-io and nbdcopy (scripts/deps.sh test-image installs them), and
# the archives in ${IMAGE_OUT:-_out/images} (make image). Everything it starts is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${IMAGE_OUT:-_out/images}
work=
pod=()
ctrs=()

fail() {
	echo "test-image: FAIL: $*" >&2
	for c in "${ctrs[@]}"; do
		echo "--- podman logs $c (last 30 lines)" >&2
		"${pod[@]}" logs "$c" 2>&1 | tail -30 >&2 || true
	done
	exit 1
}
# cleanup: the containers, the images, then the directory. Not `podman system reset`, which also
# removes the host's podman networks, shared by every storage.
cleanup() {
	if [ ${#pod[@]} -gt 0 ]; then
		for c in "${ctrs[@]}"; do "${pod[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
		"${pod[@]}" rmi -a -f >/dev/null 2>&1 || true
	fi
	if [ -n "$work" ]; then
		# A mount left under the storage (a container podman failed to remove) would stop rm.
		awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l || true
		rm -rf "$work"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
step() { echo "== $*" >&2; }

[ "$(id -u)" = 0 ] || fail "needs root (podman with host networking, bind mounts written by the containers); run as root"
for tool in podman runc jq qemu-io nbdcopy nbdinfo; do
	command -v "$tool" >/dev/null 2>&1 || fail "$tool not found (scripts/deps.sh test-image installs it)"
done
for f in torusd.oci.tar torus-csi.oci.tar VERSION; do
	[ -f "$out/$f" ] || fail "$out/$f missing: run make image first"
done
version=$(cat "$out/VERSION")
profile=/usr/share/containers/seccomp.json
[ -r "$profile" ] || fail "$profile (podman's default seccomp profile) not found"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/torus-image-test.XXXXXX")
mkdir -p "$work/data" "$work/tmp"
export CONTAINERS_CONF=$PWD/scripts/image/containers.conf
pod=(podman --root "$work/storage" --runroot "$work/run" --tmpdir "$work/tmp")
jq '.syscalls += [{"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"], "action": "SCMP_ACT_ALLOW"}]' \
	"$profile" >"$work/seccomp.json"
name="torus-image-test-$$"
run=("${pod[@]}" run --pull=never --network host --security-opt "seccomp=$work/seccomp.json"
	-v "$work/data:/var/lib/torus")

# load ARCHIVE: load it into the test's storage and print the image's name.
load() {
	local loaded img
	loaded=$("${pod[@]}" load -i "$1" 2>&1) || { echo "$loaded" >&2; fail "podman load -i $1"; }
	img=$(sed -n 's/^Loaded image: //p' <<<"$loaded")
	[ -n "$img" ] || fail "podman load -i $1 loaded no image"
	local v
	v=$("${pod[@]}" image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$img")
	[ "$v" = "$version" ] || fail "$img: label org.opencontainers.image.version is '$v', want '$version'"
	echo "$img"
}
step "podman load $out/torusd.oci.tar and $out/torus-csi.oci.tar"
torusd_img=$(load "$out/torusd.oci.tar")
csi_img=$(load "$out/torus-csi.oci.tar")
echo "   $torusd_img, $csi_img" >&2

step "torusd dev --nodes 3 from $torusd_img"
dev=$name-dev
ctrs+=("$dev")
"${run[@]}" -d --name "$dev" "$torusd_img" \
	dev --nodes 3 --data-dir /var/lib/torus --size 256MiB --etcd-listen 127.0.0.1:0 >/dev/null
# Its stdout is two lines, etcd then tls, once everything serves.
stdout=
for _ in $(seq 300); do
	stdout=$("${pod[@]}" logs "$dev" 2>/dev/null)
	grep -q '^tls: ' <<<"$stdout" && break
	[ "$("${pod[@]}" inspect --format '{{.State.Running}}' "$dev")" = true ] || fail "torusd dev exited"
	sleep 0.1
done
etcd=$(sed -n 's/^etcd: //p' <<<"$stdout")
if [ -z "$etcd" ] || ! grep -q '^tls: ' <<<"$stdout"; then
	fail "torusd dev did not print its etcd and tls lines"
fi
echo "   etcd: $etcd" >&2
ctl=("${pod[@]}" exec -e "TORUS_ETCD=$etcd" "$dev" torusctl)

step "torusctl volume create img0 --size 64MiB --replication 3 (in the container)"
"${ctl[@]}" volume create img0 --size 64MiB --replication 3 >&2 || fail "torusctl volume create"
"${ctl[@]}" node list >&2 || fail "torusctl node list"

sock=$work/data/img0.sock
uri="nbd+unix:///torus?socket=$sock"
# serve IMAGE: torusblk serve img0 from IMAGE, on the socket; prints the container's name.
serve() {
	local c=$name-serve-$((${#ctrs[@]}))
	ctrs+=("$c")
	rm -f "$sock"
	"${run[@]}" -d --name "$c" --entrypoint torusblk "$1" \
		serve img0 --etcd "$etcd" --tls-dir /var/lib/torus/client --listen unix:/var/lib/torus/img0.sock >/dev/null
	for _ in $(seq 300); do
		[ -S "$sock" ] && nbdinfo --size "$uri" >/dev/null 2>&1 && break
		[ "$("${pod[@]}" inspect --format '{{.State.Running}}' "$c")" = true ] || fail "torusblk serve ($1) exited"
		sleep 0.1
	done
	[ "$(nbdinfo --size "$uri" 2>/dev/null)" = 67108864 ] || fail "the export on $sock does not answer with 64 MiB"
	serving=$c
}
serving=
# stop CONTAINER: SIGTERM, and it must exit 0 (drained, durable).
stop() {
	"${pod[@]}" stop -t 30 "$1" >/dev/null || fail "podman stop $1"
	local code
	code=$("${pod[@]}" inspect --format '{{.State.ExitCode}}' "$1")
	[ "$code" = 0 ] || fail "$1 exited $code on SIGTERM, want 0"
}

step "torusblk serve img0 from $torusd_img; write and read back with qemu-io and nbdcopy"
serve "$torusd_img"
head -c 8M /dev/urandom >"$work/random"
nbdcopy "$work/random" "$uri" || fail "nbdcopy of 8 MiB of random data into the export"
qemu-io -f raw -c 'write -P 0xab 16M 1M' -c 'read -P 0xab 16M 1M' "$uri" >&2 ||
	fail "qemu-io: pattern 0xab written at 16 MiB did not read back"
nbdcopy "$uri" "$work/back" || fail "nbdcopy out of the export"
cmp -n 8M "$work/random" "$work/back" || fail "the random data read back differs"

step "stop it; torusblk serve img0 from $csi_img; everything reads back"
stop "$serving"
serve "$csi_img"
rm -f "$work/back"
nbdcopy "$uri" "$work/back" || fail "nbdcopy out of the export"
cmp -n 8M "$work/random" "$work/back" || fail "the random data read back through the second server differs"
qemu-io -f raw -c 'read -P 0xab 16M 1M' -c 'read -P 0 8M 8M' -c 'read -P 0 17M 47M' "$uri" >&2 ||
	fail "qemu-io: the pattern at 16 MiB or the zeroes around it did not read back"
stop "$serving"

step "the node plugin's tools in $csi_img"
# shellcheck disable=SC2016 # the script runs in the container
"${pod[@]}" run --rm --pull=never --network none --entrypoint /bin/sh "$csi_img" -euc '
	torus-csi --help >/dev/null
	torusblk --help >/dev/null
	torusctl --help >/dev/null
	for t in mkfs.ext4 mkfs.xfs blkid mount umount resize2fs xfs_growfs e2fsck; do
		command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }
	done
	truncate -s 64M /tmp/ext4 && mkfs.ext4 -q -m0 -E nodiscard,lazy_itable_init=1 /tmp/ext4
	[ "$(blkid -o value -s TYPE /tmp/ext4)" = ext4 ] || { echo "blkid: /tmp/ext4 is not ext4" >&2; exit 1; }
	truncate -s 128M /tmp/ext4
	resize2fs -f /tmp/ext4 >/tmp/log 2>&1 || { cat /tmp/log >&2; exit 1; }
	e2fsck -fn /tmp/ext4 >/tmp/log 2>&1 || { cat /tmp/log >&2; exit 1; }
	[ "$(blkid -o value -s TYPE /tmp/ext4)" = ext4 ] || { echo "blkid: /tmp/ext4 is not ext4 after resize2fs" >&2; exit 1; }
	truncate -s 320M /tmp/xfs && mkfs.xfs -q -K /tmp/xfs
	[ "$(blkid -o value -s TYPE /tmp/xfs)" = xfs ] || { echo "blkid: /tmp/xfs is not xfs" >&2; exit 1; }
' || fail "the tools of $csi_img"

step "stop torusd dev"
stop "$dev"
echo "test-image: ok: $torusd_img ran a cluster and served a volume; $csi_img served it again and has its tools" >&2
