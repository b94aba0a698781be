#!/usr/bin/env bash
# make demo: until the cluster lands, one volume on a local store served over
# NBD, with a short fio verify run through it. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/var/tmp}/torus-demo.XXXXXX")
sock="$work/nbd.sock"
pid=
cleanup() {
	[ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

echo "== torusblk serve: a 1 GiB volume in $work/store, NBD on $sock"
bin/torusblk serve --store "$work/store" --size 1GiB --listen "unix:$sock" 2>"$work/serve.log" &
pid=$!
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat "$work/serve.log"; echo "demo: the server did not start" >&2; exit 1; }
uri="nbd+unix:///torus?socket=$sock"

echo "== nbdinfo $uri"
nbdinfo "$uri" | sed 's/^/   /'

echo "== fio: 128 MiB of 4K random writes at QD32, then every block read back and verified (crc32c)"
fio --name=verify --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size=128M \
	--verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting \
	--output-format=normal | grep -E 'IOPS|err=|verify:'
fio --name=read --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 --size=256M \
	--runtime=5 --time_based --output-format=normal | grep -E 'IOPS|err='
echo "   (a read phase with IOPS above and err=0 means every written block verified)"

kill "$pid"; wait "$pid" || true; pid=
echo "== server log"
sed 's/^/   /' "$work/serve.log"
echo "== store on disk (thin: only written chunks take space)"
du -h --apparent-size "$work/store/volume.store" | sed 's/^/   apparent /'
du -h "$work/store/volume.store" | sed 's/^/   allocated /'
echo "demo: done"
