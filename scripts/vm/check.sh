#!/usr/bin/env bash
# Checks the VM harness on each kernel: it boots, the command's exit status comes back, and the
# block drivers the project needs are there (ublk only from 6.0 and in trixie/backports; nbd and
# loop everywhere), plus ext4 on the --disk and fio.
#
# Usage: scripts/vm/check.sh [trixie] [backports] [bookworm]   (default: all three, one at a time)
# Ends with 'N passed, N failed' and exits non-zero when any kernel failed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(trixie backports bookworm)

# The guest side: prints what it finds; exits 1 on the first missing piece.
probe='
set -e
want_ublk=$1
echo "kernel $(uname -r)"
for d in /dev/nbd0 /dev/loop-control; do [ -e $d ] || { echo "missing $d"; exit 1; }; done
if [ "$want_ublk" = 1 ]; then
	[ -e /dev/ublk-control ] || { echo "missing /dev/ublk-control"; exit 1; }
else
	[ ! -e /dev/ublk-control ] || { echo "unexpected /dev/ublk-control"; exit 1; }
fi
grep -qw ext4 /proc/filesystems || { echo "no ext4"; exit 1; }
mountpoint -q /mnt/disk || { echo "/mnt/disk not mounted"; exit 1; }
dd if=/dev/zero of=/mnt/disk/probe bs=4096 count=16 oflag=direct status=none || { echo "O_DIRECT write on /mnt/disk failed"; exit 1; }
fio --version
echo "guest ok"
exit 7
'

pass=0 failed=0
for k in "${kernels[@]}"; do
	case "$k" in
	bookworm) ublk=0 ;;
	*) ublk=1 ;;
	esac
	echo "--- $k" >&2
	"$here/run.sh" --kernel "$k" --disk 256M --timeout 300 -- bash -c "$probe" probe "$ublk"
	rc=$?
	# 7 proves the guest's exit status reaches the caller.
	if [ $rc -eq 7 ]; then
		echo "ok $k" >&2
		pass=$((pass + 1))
	else
		echo "FAIL $k (exit $rc, want 7)" >&2
		failed=$((failed + 1))
	fi
done
echo "$pass passed, $failed failed"
[ $failed -eq 0 ]
