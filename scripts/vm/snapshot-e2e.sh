#!/usr/bin/env bash
# End-to-end test of snapshots and clones of a cluster volume on real kernels, in a VM per kernel.
#
# Usage: scripts/vm/snapshot-e2e.sh [trixie] [backports] [bookworm]   (default: all three)
#
# In the guest: `torusd dev` (embedded etcd, 3 nodes), a volume (R=2) attached with `--mode auto`
# (ublk on trixie and backports, the kernel NBD client on bookworm), ext4 on it with files of random
# data. Then `fsfreeze -f`, `torusctl snapshot create`, `fsfreeze -u`, and changes after the snapshot
# (a file overwritten, one patched in the middle, one deleted, one added). A clone of the snapshot
# attached on a second device must pass `e2fsck -fn` and hold exactly the files of the snapshot; a file
# written into the clone must not appear in the volume, and the volume, detached and attached again,
# must pass `e2fsck -fn` and hold exactly its state after the snapshot.
# Prints 'N passed, N failed' per kernel and exits non-zero when anything failed.
set -euo pipefail

if [ "${1:-}" = --guest ]; then
	shift
	bindir=$1
	want=$2 # ublk or nbd
	export PATH=$PATH:/usr/sbin:/sbin
	pass=0 fail=0 frozen=0
	ok() { echo "ok   - $*"; pass=$((pass + 1)); }
	bad() { echo "FAIL - $*"; fail=$((fail + 1)); }
	finish() {
		[ "$frozen" = 0 ] || fsfreeze -u /mnt/vol || true
		echo "$TORUS_VM_KERNEL ($TORUS_VM_KVER): $pass passed, $fail failed"
		[ "$fail" = 0 ]
		exit
	}
	ctl() { timeout 120 "$bindir/torusctl" --etcd "$etcd" "$@"; }
	mkdir -p /mnt/vol /mnt/clone
	ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || true

	"$bindir/torusd" dev --nodes 3 --data-dir /mnt/disk/dev --size 512MiB >/tmp/dev.out 2>/tmp/dev.log &
	dpid=$!
	for _ in $(seq 600); do grep -q '^tls: ' /tmp/dev.out && break; kill -0 $dpid 2>/dev/null || break; sleep 0.1; done
	etcd=$(sed -n 's/^etcd: //p' /tmp/dev.out)
	tls=$(sed -n 's/^tls: //p' /tmp/dev.out)
	if [ -n "$etcd" ] && [ -n "$tls" ]; then ok "torusd dev --nodes 3: $etcd"; else
		bad "torusd dev did not start: $(tail -5 /tmp/dev.log)"
		finish
	fi

	attach() { # NAME: starts torusblk attach NAME in the background; sets dev and apid
		: >"/tmp/$1.dev"
		"$bindir/torusblk" attach "$1" --etcd "$etcd" --tls-dir "$tls" --mode auto >"/tmp/$1.dev" 2>>"/tmp/$1.log" &
		apid=$!
		dev=
		for _ in $(seq 600); do
			dev=$(head -n1 "/tmp/$1.dev")
			[ -n "$dev" ] && [ -b "$dev" ] && break
			kill -0 $apid 2>/dev/null || break
			sleep 0.1
		done
		if [ -n "$dev" ] && [ -b "$dev" ]; then
			case "$want:$dev" in
			ublk:/dev/ublkb* | nbd:/dev/nbd*) ok "attach $1 --mode auto: $dev ($want)" ;;
			*) bad "attach $1 --mode auto: $dev, want $want" ;;
			esac
			return 0
		fi
		bad "attach $1 printed no device: $(tail -5 "/tmp/$1.log")"
		return 1
	}
	detach() { # DEV PID NAME
		"$bindir/torusblk" detach "$1" && wait "$2" && ok "detach $3 ($1)" || bad "detach $3 ($1): $(tail -3 "/tmp/$3.log")"
	}
	# fsck DEV WHAT: e2fsck -fn finds nothing, and there is no journal to replay (e2fsck -n skips the
	# replay and may pass on a filesystem whose journal holds its files).
	fsck() {
		if ! e2fsck -fn "$1" >/tmp/fsck 2>&1; then
			bad "e2fsck -fn on $2 ($1), exit $?: $(tail -8 /tmp/fsck)"
		elif dumpe2fs -h "$1" 2>/dev/null | grep -q '^Filesystem features:.*needs_recovery'; then
			bad "$2 ($1) has a journal to replay (needs_recovery)"
		else
			ok "e2fsck -fn clean on $2 ($1), no journal to replay"
		fi
	}
	# exactly SUMS DIR WHAT: DIR holds exactly the files listed in SUMS (made by sha256sum in DIR), with
	# those contents.
	exactly() {
		local got want
		got=$(cd "$2" && find . -path ./lost+found -prune -o -type f -printf '%P\n' | sort)
		want=$(sed 's/^[0-9a-f]*  //' "$1" | sort)
		if [ "$got" != "$want" ]; then
			bad "$3: files differ: have [$(echo $got)], want [$(echo $want)]"
		elif (cd "$2" && sha256sum -c --quiet "$1") >/tmp/sumc 2>&1; then
			ok "$3: $(echo "$want" | wc -l) files, every byte as recorded"
		else
			bad "$3: contents differ: $(head -5 /tmp/sumc)"
		fi
	}

	ctl volume create vol --size 256MiB --replication 2 >/dev/null && ok "volume create vol (256 MiB, R=2)" || bad "volume create vol"
	attach vol || finish
	vdev=$dev vpid=$apid
	mkfs.ext4 -q -F "$vdev" && mount "$vdev" /mnt/vol && ok "mkfs.ext4 and mount on $vdev" || {
		bad "mkfs.ext4/mount on $vdev"
		finish
	}
	mkdir /mnt/vol/d
	for i in 1 2 3 4 5; do head -c $((i << 20)) /dev/urandom >/mnt/vol/f$i; done
	for i in $(seq 20); do head -c $((RANDOM + 1)) /dev/urandom >/mnt/vol/d/s$i; done
	(cd /mnt/vol && find . -path ./lost+found -prune -o -type f -printf '%P\0' | xargs -0 sha256sum) >/tmp/pre.sums

	# The snapshot of a frozen filesystem: clean, no journal to replay.
	if fsfreeze -f /mnt/vol; then frozen=1; else bad "fsfreeze -f /mnt/vol"; fi
	ctl snapshot create vol@s1 --wait 60s >/tmp/snap.out 2>&1 && ok "snapshot create vol@s1: $(cat /tmp/snap.out)" ||
		bad "snapshot create vol@s1: $(cat /tmp/snap.out) $(tail -3 /tmp/vol.log)"
	if fsfreeze -u /mnt/vol; then frozen=0; else bad "fsfreeze -u /mnt/vol"; fi
	grep -q 'paused for a snapshot' /tmp/vol.log && ok "the attached client paused its writes for the snapshot" ||
		bad "the attach log does not say 'paused for a snapshot'"

	# Changes after the snapshot: overwritten, patched in the middle, deleted, added.
	head -c $((1 << 20)) /dev/urandom >/mnt/vol/f1
	dd if=/dev/urandom of=/mnt/vol/f4 bs=4k seek=100 count=64 conv=notrunc status=none
	rm /mnt/vol/f3 /mnt/vol/d/s7
	head -c $((2 << 20)) /dev/urandom >/mnt/vol/g1
	(cd /mnt/vol && find . -path ./lost+found -prune -o -type f -printf '%P\0' | xargs -0 sha256sum) >/tmp/post.sums
	sync
	(cd /mnt/vol && ! sha256sum -c --quiet /tmp/pre.sums >/dev/null 2>&1) && ok "the volume changed after the snapshot" ||
		bad "the volume still matches the snapshot's sums: the test proves nothing"

	ctl volume clone vol@s1 vol1c >/tmp/clone.out 2>&1 && ok "volume clone vol@s1 vol1c" || bad "volume clone: $(cat /tmp/clone.out)"
	if attach vol1c; then
		cdev=$dev cpid=$apid
		[ "$cdev" != "$vdev" ] && ok "clone on a second device" || bad "clone got the volume's device $cdev"
		fsck "$cdev" "the clone"
		if mount "$cdev" /mnt/clone; then
			exactly /tmp/pre.sums /mnt/clone "clone vol1c"
			# A write into the clone: it stays in the clone.
			head -c $((3 << 20)) /dev/urandom >/mnt/clone/c1
			(cd /mnt/clone && sha256sum c1) >/tmp/c1.sum
			cat /tmp/pre.sums /tmp/c1.sum >/tmp/clone.sums
			sync && umount /mnt/clone
			fsck "$cdev" "the clone after a write"
			if mount "$cdev" /mnt/clone; then
				exactly /tmp/clone.sums /mnt/clone "clone vol1c remounted after a write"
				umount /mnt/clone
			else
				bad "remount of the clone"
			fi
		else
			bad "mount $cdev (clone)"
		fi
		grep -q 'paused for a snapshot' "/tmp/vol1c.log" && bad "the clone's client paused for a snapshot" || true
	fi

	# The volume holds its own state, not the clone's write.
	[ ! -e /mnt/vol/c1 ] && ok "the clone's write is not in the volume" || bad "c1 written into the clone appears in the volume"
	umount /mnt/vol && ok "umount the volume" || bad "umount /mnt/vol"
	fsck "$vdev" "the volume"
	detach "$vdev" "$vpid" vol
	[ -n "${cdev:-}" ] && detach "$cdev" "$cpid" vol1c
	# Attached again, from the nodes alone: clean, and exactly its state after the snapshot.
	if attach vol; then
		fsck "$dev" "the volume attached again"
		if mount "$dev" /mnt/vol; then
			exactly /tmp/post.sums /mnt/vol "volume vol attached again"
			umount /mnt/vol
		else
			bad "mount of the volume attached again"
		fi
		detach "$dev" "$apid" vol
	fi
	ctl snapshot list vol >/tmp/snaps.out 2>&1 && grep -q '^vol@s1 .* ready' /tmp/snaps.out && ok "snapshot list shows vol@s1 ready" ||
		bad "snapshot list: $(cat /tmp/snaps.out)"
	kill $dpid && wait $dpid && ok "torusd dev stopped cleanly" || bad "torusd dev exit: $(tail -3 /tmp/dev.log)"
	finish
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(trixie backports bookworm)
mkdir -p .vmbin
go build -o .vmbin/torusblk ./cmd/torusblk
go build -o .vmbin/torusd ./cmd/torusd
go build -o .vmbin/torusctl ./cmd/torusctl
failed=()
for k in "${kernels[@]}"; do
	want=ublk
	[ "$k" = bookworm ] && want=nbd
	echo "--- snapshot-e2e on $k (expect $want)" >&2
	scripts/vm/run.sh --kernel "$k" --disk 2G --timeout 900 -- \
		"$root/scripts/vm/snapshot-e2e.sh" --guest "$root/.vmbin" "$want" || failed+=("$k")
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "snapshot-e2e: FAILED on ${failed[*]}" >&2
	exit 1
fi
