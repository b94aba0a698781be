#!/usr/bin/env bash
# make bench-vm: in one boot of a real kernel (default trixie 6.12), the same fio jobs on
#   - /dev/ublkbN   (torusblk attach --mode ublk, store on the guest's ext4 disk)
#   - /dev/loopN    (losetup --direct-io=on over a plain file on the same disk)
#   - /dev/nbdN     (torusblk attach --mode nbd: the kernel NBD client, same store format)
# then a table of IOPS and p50/p99 completion latency, and the ratios the ublk issue targets:
# ublk >= 1.0x loop and >= 2x kernel NBD at 4K QD32 randread and randwrite.
# A benchmark, not a test: it exits 0 whatever the numbers, non-zero only when a target cannot run.
#
# Usage: scripts/vm/bench-vm.sh [--kernel trixie|backports] [--runtime SECS] [--size MiB]
# Under TCG every number is far below bare metal; only the ratios mean something.
set -euo pipefail

if [ "${1:-}" = --guest ]; then
	bin=$2 runtime=$3 size=$4
	out=${TORUS_VM_OUT:-/tmp}
	jobs="randread-4k-qd32 randwrite-4k-qd32 randread-4k-qd1 randwrite-4k-qd1"
	run_jobs() { # target device
		for j in $jobs; do
			rw=${j%%-*} qd=${j##*qd}
			fio --name="$j" --filename="$2" --direct=1 --ioengine=io_uring --rw="$rw" --bs=4k \
				--iodepth="$qd" --size="${size}M" --runtime="$runtime" --time_based --numjobs=1 \
				--output-format=json --output="$out/$1-$j.json" >/dev/null ||
				{ echo "bench-vm: fio $j on $1 ($2) failed" >&2; return 1; }
		done
	}
	prefill() { fio --name=prefill --filename="$1" --direct=1 --ioengine=io_uring --rw=write --bs=1m --iodepth=4 --size="${size}M" >/dev/null; }
	attach() { # mode -> dev, apid
		: >/tmp/dev
		"$bin" attach --store "/mnt/disk/store-$1" --size "${size}MiB" --mode "$1" >/tmp/dev 2>>"$out/attach.log" &
		apid=$!
		for _ in $(seq 600); do
			dev=$(head -n1 /tmp/dev)
			[ -n "$dev" ] && [ -b "$dev" ] && return 0
			kill -0 $apid 2>/dev/null || break
			sleep 0.1
		done
		echo "bench-vm: attach --mode $1 failed" >&2
		cat "$out/attach.log" >&2
		return 1
	}
	for mode in ublk nbd; do
		attach $mode
		prefill "$dev"
		run_jobs $mode "$dev"
		"$bin" detach "$dev"
		wait $apid
	done
	head -c 0 /dev/null >/mnt/disk/loop.img
	truncate -s "${size}M" /mnt/disk/loop.img
	loopdev=$(losetup --direct-io=on --find --show /mnt/disk/loop.img)
	prefill "$loopdev"
	run_jobs loop "$loopdev"
	losetup -d "$loopdev"
	exit 0
fi

kernel=trixie runtime=10 size=512
while [ $# -gt 0 ]; do
	case "$1" in
	--kernel) kernel=$2; shift 2 ;;
	--runtime) runtime=$2; shift 2 ;;
	--size) size=$2; shift 2 ;;
	*) echo "usage: bench-vm.sh [--kernel trixie|backports] [--runtime SECS] [--size MiB]" >&2; exit 2 ;;
	esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
mkdir -p .vmbin
go build -o .vmbin/torusblk ./cmd/torusblk
res=$(mktemp -d)
trap 'rm -rf "$res"' EXIT
scripts/vm/run.sh --kernel "$kernel" --disk 3G --timeout 1800 --out "$res" -- \
	"$root/scripts/vm/bench-vm.sh" --guest "$root/.vmbin/torusblk" "$runtime" "$size"

python3 - "$res" "$kernel" <<'PY'
import json, os, sys
res, kernel = sys.argv[1], sys.argv[2]
jobs = ["randread-4k-qd32", "randwrite-4k-qd32", "randread-4k-qd1", "randwrite-4k-qd1"]
targets = ["ublk", "loop", "nbd"]
def load(t, j):
    with open(os.path.join(res, f"{t}-{j}.json")) as f:
        d = json.load(f)["jobs"][0]
    side = d["read"] if d["read"]["io_bytes"] else d["write"]
    pct = side["clat_ns"].get("percentile", {})
    return side["iops"], pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000
r = {(t, j): load(t, j) for t in targets for j in jobs}
print(f"kernel: {kernel} (qemu TCG, 2 vCPUs); fio io_uring direct=1, 4 KiB")
print(f"{'job':>18}" + "".join(f"{t:>26}" for t in targets))
print(f"{'':>18}" + "".join(f"{'IOPS':>10}{'p50µs':>8}{'p99µs':>8}" for _ in targets))
for j in jobs:
    print(f"{j:>18}" + "".join(f"{r[t,j][0]:>10.0f}{r[t,j][1]:>8.0f}{r[t,j][2]:>8.0f}" for t in targets))
print()
print(f"{'job':>18}{'ublk/loop':>12}{'ublk/nbd':>12}")
for j in jobs:
    u, l, n = r["ublk", j][0], r["loop", j][0], r["nbd", j][0]
    print(f"{j:>18}{u/l:>11.2f}x{u/n:>11.2f}x")
for j in jobs[:2]:
    u, l, n = r["ublk", j][0], r["loop", j][0], r["nbd", j][0]
    print(f"target {j}: ublk >= 1.0x loop: {'PASS' if u >= l else 'MISS'} ({u/l:.2f}x); ublk >= 2x nbd: {'PASS' if u >= 2*n else 'MISS'} ({u/n:.2f}x)")
PY
