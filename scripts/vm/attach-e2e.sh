#!/usr/bin/env bash
# End-to-end test of `torusblk attach|list|detach|recover` on real kernels, in a VM per kernel.
#
# Usage: scripts/vm/attach-e2e.sh [trixie] [backports] [bookworm]   (default: all three)
#
# On kernels with ublk (trixie 6.12, backports 7.x) `--mode auto` must pick ublk; on bookworm
# (6.1, no ublk) it must fall back to the kernel NBD client. On each: a filesystem round trip
# (mkfs.ext4, files, sync, umount, e2fsck -fn, remount, compare), fio verify=crc32c at QD32 on
# the raw device, discard reaching the store (its allocated space drops), and detach leaving no
# device. With ublk also: kill -9 of the server in the middle of a fio verify job, then
# `torusblk recover`, and the same fio job finishes and verifies every block. Last, the store on a
# raw block device (a direct-io loop device): written with fio verify, detached, attached again,
# and everything re-verified.
# Prints 'N passed, N failed' per kernel and exits non-zero when anything failed.
set -euo pipefail

if [ "${1:-}" = --guest ]; then
	shift
	bin=$1
	want=$2 # ublk or nbd
	pass=0 fail=0
	ok() { echo "ok   - $*"; pass=$((pass + 1)); }
	bad() { echo "FAIL - $*"; fail=$((fail + 1)); }
	finish() {
		echo "$TORUS_VM_KERNEL ($TORUS_VM_KVER): $pass passed, $fail failed"
		[ "$fail" = 0 ]
		exit
	}
	store=/mnt/disk/store
	mkdir -p /mnt/vol
	attach() { # [STORE SIZE [ARG...]] starts torusblk attach in the background, sets dev and apid
		: >/tmp/dev
		"$bin" attach --store "${1:-$store}" --size "${2:-1GiB}" --mode auto "${@:3}" >/tmp/dev 2>>/tmp/attach.log &
		apid=$!
		for _ in $(seq 600); do
			dev=$(head -n1 /tmp/dev)
			[ -n "$dev" ] && [ -b "$dev" ] && return 0
			kill -0 $apid 2>/dev/null || break
			sleep 0.1
		done
		return 1
	}

	if attach; then ok "attach --mode auto printed $dev"; else
		bad "attach did not print a device"
		cat /tmp/attach.log
		finish
	fi
	case "$want:$dev" in
	ublk:/dev/ublkb* | nbd:/dev/nbd*) ok "auto picked $want" ;;
	*) bad "auto picked $dev, want $want" ;;
	esac
	grep -q "mode auto: using" /tmp/attach.log && ok "attach says which mode and why" || bad "attach did not say why it chose its mode"
	"$bin" list | grep -q "^$dev .*serving" && ok "list shows $dev serving" || bad "list does not show $dev: $("$bin" list)"
	sched=$(cat "/sys/block/${dev#/dev/}/queue/scheduler")
	case "$sched" in *"[none]"*) ok "I/O scheduler none by default ($sched)" ;; *) bad "I/O scheduler is not none: $sched" ;; esac

	# Filesystem round trip.
	if mkfs.ext4 -q -F "$dev" && mount "$dev" /mnt/vol; then
		for i in 1 2 3 4 5 6; do head -c $((3 << 20)) /dev/urandom >/mnt/vol/f$i; done
		(cd /mnt/vol && sha256sum f* >/tmp/sums)
		sync && umount /mnt/vol
		if e2fsck -fn "$dev" >/tmp/fsck 2>&1; then ok "e2fsck -fn clean"; else bad "e2fsck: $(cat /tmp/fsck)"; fi
		mount "$dev" /mnt/vol && (cd /mnt/vol && sha256sum -c --quiet /tmp/sums) && ok "files intact after remount" || bad "files differ after remount"
		umount /mnt/vol
	else
		bad "mkfs.ext4/mount on $dev"
	fi

	# Raw device verify.
	if fio --name=v --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
		--size=128M --offset=256M --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
		--output=/tmp/fio.out >/dev/null 2>&1; then
		ok "fio verify=crc32c QD32 on $dev ($(grep -o 'IOPS=[0-9.k]*' /tmp/fio.out | tr '\n' ' '))"
	else
		bad "fio verify on $dev: $(tail -5 /tmp/fio.out)"
	fi

	# Discard reaches the store.
	sync
	before=$(du -k "$store/volume.store" | cut -f1)
	blkdiscard "$dev"
	sleep 0.5
	after=$(du -k "$store/volume.store" | cut -f1)
	if [ "$after" -lt $((before / 4)) ]; then ok "discard freed store space (${before} KiB -> ${after} KiB)"; else bad "discard did not free space (${before} KiB -> ${after} KiB)"; fi

	if [ "$want" = ublk ]; then
		# kill -9 the server during a fio verify job, recover, the job finishes and verifies.
		fio --name=k --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 \
			--size=96M --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
			--output=/tmp/fiok.out >/dev/null 2>&1 &
		fpid=$!
		sleep 4
		if kill -0 $fpid 2>/dev/null; then
			kill -9 $apid
			wait $apid 2>/dev/null || true
			"$bin" list | grep -q "server dead: torusblk recover $dev" && ok "list says the dead server's device needs recover" || bad "list after kill -9: $("$bin" list)"
			: >/tmp/dev
			"$bin" recover "$dev" >/tmp/dev 2>>/tmp/attach.log &
			apid=$!
			if wait $fpid; then ok "fio verify survived kill -9 + recover ($(grep -o 'IOPS=[0-9.k]*' /tmp/fiok.out | tr '\n' ' '))"; else bad "fio across kill -9/recover: $(tail -8 /tmp/fiok.out)"; fi
			[ "$(head -n1 /tmp/dev)" = "$dev" ] && ok "recover printed $dev" || bad "recover printed '$(cat /tmp/dev)'"
		else
			bad "fio finished before the kill; the test proves nothing"
		fi
	fi

	"$bin" detach "$dev" && ok "detach $dev" || bad "detach $dev: $(tail -3 /tmp/attach.log)"
	wait $apid 2>/dev/null && ok "attach process exited 0" || bad "attach process exit status $?"
	case "$dev" in
	/dev/ublkb*) [ -e "$dev" ] && bad "$dev still exists after detach" || ok "no $dev after detach" ;;
	/dev/nbd*) [ "$(cat /sys/block/${dev#/dev/}/size)" = 0 ] && ok "$dev disconnected (size 0)" || bad "$dev still has a size after detach" ;;
	esac
	[ -z "$("$bin" list | tail -n +2)" ] && ok "list is empty" || bad "list after detach: $("$bin" list)"
	# And the wrong inputs get clear errors.
	out=$("$bin" attach --store "$store" --size 2GiB --mode "$want" 2>&1) && bad "attach with another size succeeded" ||
		{ echo "$out" | grep -q "made for a 1 GiB volume" && ok "attach with another size: clear error" || bad "attach with another size: $out"; }
	ndev() { # ublk devices plus connected NBD devices
		local n=0 f
		n=$(ls /dev | grep -c '^ublkb' || true)
		for f in /sys/block/nbd*/size; do [ -e "$f" ] && [ "$(cat "$f")" != 0 ] && n=$((n + 1)); done
		echo "$n"
	}
	before=$(ndev)
	out=$("$bin" attach --store "$store" --size 1GiB --mode "$want" --io-scheduler bogus 2>&1) && bad "attach --io-scheduler bogus succeeded" ||
		{ echo "$out" | grep -q -e "--io-scheduler: I/O scheduler bogus on /dev/.*available: .*none" && ok "attach --io-scheduler bogus: clear error" || bad "attach --io-scheduler bogus: $out"; }
	[ "$(ndev)" = "$before" ] && [ -z "$("$bin" list | tail -n +2)" ] && ok "failed attach left no device behind" ||
		bad "failed attach left a device: $(ndev) devices, list: $("$bin" list)"
	out=$("$bin" recover /dev/ublkb9 2>&1) && bad "recover of an unknown device succeeded" ||
		{ echo "$out" | grep -q "was not attached by torusblk" && ok "recover of an unknown device: clear error" || bad "recover unknown: $out"; }
	if [ "$want" = nbd ]; then
		out=$("$bin" attach --store "$store" --size 1GiB --mode ublk 2>&1) && bad "--mode ublk without ublk succeeded" ||
			{ echo "$out" | grep -q "ublk is not available" && ok "--mode ublk without ublk: clear error" || bad "--mode ublk: $out"; }
	fi

	# The store on a raw block device (a direct-io loop device here): written, detached, attached again, and
	# everything fio wrote verifies.
	truncate -s 300M /mnt/disk/raw.img
	raw=$(losetup --direct-io=on --find --show /mnt/disk/raw.img)
	rawjob=(--name=raw --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32 --size=96M
		--verify=crc32c --verify_fatal=1 --verify_state_save=0 --randseed=42)
	if attach "$raw" 256MiB --io-scheduler mq-deadline; then
		sched=$(cat "/sys/block/${dev#/dev/}/queue/scheduler")
		case "$sched" in *"[mq-deadline]"*) ok "--io-scheduler mq-deadline taken ($sched)" ;; *) bad "--io-scheduler mq-deadline: $sched" ;; esac
		fio "${rawjob[@]}" --filename="$dev" --do_verify=1 --output=/tmp/fior.out >/dev/null 2>&1 &&
			ok "store on block device $raw: fio verify on $dev" || bad "fio on a block-device store: $(tail -5 /tmp/fior.out)"
		"$bin" detach "$dev" && wait $apid || bad "detach of the block-device store"
		if attach "$raw" 256MiB; then
			fio "${rawjob[@]}" --filename="$dev" --verify_only --output=/tmp/fior2.out >/dev/null 2>&1 &&
				ok "block-device store: data verifies after detach and re-attach" || bad "re-verify on a block-device store: $(tail -5 /tmp/fior2.out)"
			"$bin" detach "$dev" && wait $apid || bad "second detach of the block-device store"
		else
			bad "re-attach of the block-device store: $(tail -3 /tmp/attach.log)"
		fi
	else
		bad "attach with --store $raw: $(tail -3 /tmp/attach.log)"
	fi
	losetup -d "$raw"

	# A cluster volume: `torusd dev` (embedded etcd + 3 nodes over QUIC on loopback), a volume made with
	# torusctl, attached by name; fio verify on the device; with ublk also kill -9 + recover, which waits
	# for the dead server's attach lock to expire and fences it by epoch.
	ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null || true
	bindir=$(dirname "$bin")
	"$bindir/torusd" dev --nodes 3 --data-dir /mnt/disk/dev --size 512MiB >/tmp/dev.out 2>/tmp/dev.log &
	dpid=$!
	for _ in $(seq 300); do grep -q '^tls: ' /tmp/dev.out && break; kill -0 $dpid 2>/dev/null || break; sleep 0.1; done
	etcd=$(sed -n 's/^etcd: //p' /tmp/dev.out)
	tls=$(sed -n 's/^tls: //p' /tmp/dev.out)
	if [ -n "$etcd" ] && [ -n "$tls" ]; then ok "torusd dev --nodes 3: $etcd"; else
		bad "torusd dev did not start: $(tail -5 /tmp/dev.log)"
		finish
	fi
	"$bindir/torusctl" --etcd "$etcd" volume create cv --size 256MiB --replication 3 >/dev/null &&
		ok "torusctl volume create cv (R=3)" || bad "torusctl volume create"
	: >/tmp/dev
	"$bin" attach cv --etcd "$etcd" --tls-dir "$tls" --lease-ttl 3s --mode auto >/tmp/dev 2>>/tmp/attach.log &
	apid=$!
	dev=
	for _ in $(seq 600); do
		dev=$(head -n1 /tmp/dev)
		[ -n "$dev" ] && [ -b "$dev" ] && break
		kill -0 $apid 2>/dev/null || break
		sleep 0.1
	done
	if [ -n "$dev" ] && [ -b "$dev" ]; then ok "attach cv (cluster volume) printed $dev"; else
		bad "attach of a cluster volume: $(tail -5 /tmp/attach.log)"
		finish
	fi
	out=$("$bin" attach cv --etcd "$etcd" --tls-dir "$tls" --mode "$want" 2>&1) && bad "second attach of cv succeeded" ||
		{ echo "$out" | grep -q "is attached by" && ok "second attach of cv refused: clear error" || bad "second attach: $out"; }
	cjob=(--name=c --filename="$dev" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=32
		--size=64M --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0)
	if [ "$want" = ublk ]; then
		fio "${cjob[@]}" --output=/tmp/fioc.out >/dev/null 2>&1 &
		fpid=$!
		sleep 3
		if kill -0 $fpid 2>/dev/null; then
			kill -9 $apid
			wait $apid 2>/dev/null || true
			: >/tmp/dev
			"$bin" recover "$dev" >/tmp/dev 2>>/tmp/attach.log &
			apid=$!
			if wait $fpid; then ok "cluster volume: fio verify survived kill -9 + recover ($(grep -o 'IOPS=[0-9.k]*' /tmp/fioc.out | tr '\n' ' '))"; else bad "cluster volume across kill -9/recover: $(tail -8 /tmp/fioc.out) $(tail -5 /tmp/attach.log)"; fi
		else
			bad "cluster fio finished before the kill; the test proves nothing"
		fi
	else
		fio "${cjob[@]}" --output=/tmp/fioc.out >/dev/null 2>&1 &&
			ok "cluster volume: fio verify=crc32c QD32 on $dev ($(grep -o 'IOPS=[0-9.k]*' /tmp/fioc.out | tr '\n' ' '))" ||
			bad "cluster volume fio: $(tail -5 /tmp/fioc.out)"
	fi
	"$bin" detach "$dev" && wait $apid && ok "detach of the cluster volume" || bad "detach of the cluster volume: $(tail -3 /tmp/attach.log)"
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
	echo "--- attach-e2e on $k (expect $want)" >&2
	scripts/vm/run.sh --kernel "$k" --disk 2G --timeout 900 -- \
		"$root/scripts/vm/attach-e2e.sh" --guest "$root/.vmbin/torusblk" "$want" || failed+=("$k")
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "attach-e2e: FAILED on ${failed[*]}" >&2
	exit 1
fi
