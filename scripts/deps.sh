#!/usr/bin/env bash
# Installs the Debian packages a make target needs, only when something is missing.
# Usage: scripts/deps.sh test|bench|demo|vm|image|test-image
# Needs root (apt-get); says so clearly otherwise.
set -euo pipefail

want=()
need() { # need BINARY PACKAGE
	command -v "$1" >/dev/null 2>&1 || want+=("$2")
}

case "${1:-test}" in
test | bench | demo)
	need fio fio
	need nbdinfo libnbd-bin
	need qemu-img qemu-utils
	need qemu-io qemu-utils
	need nbdkit nbdkit
	;;
vm)
	# Guests run the host's binaries over 9p; scripts/vm/run.sh installs qemu and busybox itself.
	need fio fio
	need mkfs.ext4 e2fsprogs
	need mkfs.xfs xfsprogs
	need blkdiscard util-linux
	need depmod kmod
	need xz xz-utils
	;;
image | test-image)
	# make image: buildah commits OCI archives, mmdebstrap makes torus-csi's Debian root.
	need buildah buildah
	need mmdebstrap mmdebstrap
	if [ "$1" = test-image ]; then
		# podman runs the images with runc (scripts/image/containers.conf); jq derives the seccomp
		# profile; qemu-io and nbdcopy are the NBD clients.
		need podman podman
		need runc runc
		need jq jq
		need qemu-io qemu-utils
		need nbdcopy libnbd-bin
	fi
	;;
*)
	echo "deps.sh: unknown set '$1' (want test, bench, demo, vm, image or test-image)" >&2
	exit 2
	;;
esac

# fio must have the nbd engine (Debian's fio 3.33 does, through libnbd).
if command -v fio >/dev/null 2>&1 && ! fio --enghelp 2>/dev/null | grep -qw nbd; then
	echo "deps.sh: $(command -v fio) has no ioengine=nbd; install Debian's fio (apt-get install fio)" >&2
	exit 1
fi

[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "deps.sh: missing packages: ${want[*]}; run as root or: sudo apt-get install -y ${want[*]}" >&2
	exit 1
fi
echo "deps.sh: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
