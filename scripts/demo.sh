#!/usr/bin/env bash
# make demo: a 3-node dev cluster (`torusd dev`: embedded etcd + 3 storage nodes talking QUIC on
# loopback), a replicated volume made with torusctl, attached as a block device (ublk, else the
# kernel NBD client) or, where this kernel has neither or we are not root, exported on an NBD
# socket; then a short fio verify run through it and a look at where the data went. Leaves nothing
# behind.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/var/tmp}/torus-demo.XXXXXX")
pids=()
cleanup() {
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill "${pids[i]}" 2>/dev/null && wait "${pids[i]}" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
indent() { sed 's/^/   /'; }
fail() {
	echo "demo: $*" >&2
	for f in "$work"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
	exit 1
}

metrics=127.0.0.1:$((20000 + RANDOM % 20000))
echo "== torusd dev --nodes 3: etcd and three storage nodes in $work/cluster (metrics on $metrics)"
bin/torusd dev --nodes 3 --data-dir "$work/cluster" --size 1GiB --etcd-listen 127.0.0.1:0 \
	--metrics "$metrics" >"$work/dev.out" 2>"$work/dev.log" &
pids+=($!)
for _ in $(seq 300); do grep -q '^tls: ' "$work/dev.out" && break; kill -0 "${pids[0]}" 2>/dev/null || break; sleep 0.1; done
grep -q '^tls: ' "$work/dev.out" || fail "torusd dev did not start"
indent <"$work/dev.out"
etcd=$(sed -n 's/^etcd: //p' "$work/dev.out")
tls=$(sed -n 's/^tls: //p' "$work/dev.out")
export TORUS_ETCD=$etcd TORUS_TLS_DIR=$tls

echo "== torusctl volume create demo --size 1GiB (replication 3)"
bin/torusctl volume create demo --size 1GiB --replication 3 | indent
bin/torusctl node list | indent
bin/torusctl status | indent

target= dev=
if [ "$(id -u)" = 0 ]; then
	echo "== torusblk attach demo --mode auto"
	bin/torusblk attach demo --mode auto --run-dir "$work/run" >"$work/attach.out" 2>"$work/attach.log" &
	apid=$!
	for _ in $(seq 300); do
		dev=$(head -n1 "$work/attach.out" 2>/dev/null || true)
		[ -n "$dev" ] && [ -b "$dev" ] && break
		kill -0 $apid 2>/dev/null || break
		sleep 0.1
	done
	if [ -n "$dev" ] && [ -b "$dev" ]; then
		pids+=($apid)
		grep -o 'mode auto: using [^"]*"[^"]*"' "$work/attach.log" | indent || true
		echo "   attached as $dev"
		target=(--filename="$dev" --ioengine=libaio --direct=1)
	else
		dev=
		echo "   no block device: $(grep -o 'error=.*\|torusblk attach: .*' "$work/attach.log" | tail -1)"
		echo "   (this kernel has neither ublk nor nbd; falling back to an NBD socket)"
	fi
else
	echo "== not root: no block device; the volume is exported on an NBD socket instead"
fi
if [ -z "$dev" ]; then
	sock="$work/nbd.sock"
	echo "== torusblk serve demo --listen unix:$sock"
	bin/torusblk serve demo --listen "unix:$sock" 2>"$work/serve.log" &
	pids+=($!)
	for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
	[ -S "$sock" ] || fail "torusblk serve did not start"
	uri="nbd+unix:///torus?socket=$sock"
	nbdinfo "$uri" | indent
	target=(--ioengine=nbd --uri="$uri")
fi

echo "== fio: 64 MiB of 4K random writes at QD32, each sent to all 3 replicas; then every block read back and verified (crc32c)"
fio --name=verify "${target[@]}" --rw=randwrite --bs=4k --iodepth=32 --size=64M \
	--verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting \
	--output-format=normal | grep -E 'IOPS|err=' | indent
echo "   (fio exits non-zero on any verify error; err=0 above means every block verified)"
fio --name=read "${target[@]}" --rw=randread --bs=4k --iodepth=32 --size=64M \
	--runtime=5 --time_based --output-format=normal | grep -E 'IOPS|err=' | indent

echo "== where the data went: each node's counters (torusd metrics)"
curl -fsS "http://$metrics/metrics" 2>/dev/null | grep -E '^torus_(node_writes_total|node_reads_total|store_slots_used)' | indent ||
	echo "   (curl missing or metrics unavailable)"
echo "   each written 1 MiB chunk lives on all 3 nodes: their slot counts match"

for ((i = ${#pids[@]} - 1; i >= 1; i--)); do kill "${pids[i]}" 2>/dev/null; wait "${pids[i]}" 2>/dev/null || true; done
pids=("${pids[0]}")
echo "== torusctl volume info demo (after the server stopped: epoch counts attaches)"
bin/torusctl volume info demo | indent
echo "demo: done"
