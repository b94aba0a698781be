#!/usr/bin/env bash
# Online resize on real kernels (internal/blockdev/resize_vm_test.go, build tag vm): a cluster
# volume attached with torusblk (ublk where the kernel has it, and the kernel NBD client), ext4
# mounted on it, grown with torusctl volume resize and resize2fs while mounted, fio verify=crc32c
# before and after. On a kernel whose ublk cannot grow a live device (trixie 6.12) the test checks
# what torusctl and torusblk say, then detaches and attaches again as they say.
#
# Usage: scripts/vm/resize-vm.sh [backports] [trixie] [bookworm]   (default: all three)
# Exits non-zero when any kernel failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(backports trixie bookworm)
mkdir -p .vmbin
for b in torusd torusctl torusblk; do go build -o ".vmbin/$b" "./cmd/$b"; done
go test -c -tags vm -o .vmbin/blockdev.test ./internal/blockdev/
failed=()
for k in "${kernels[@]}"; do
	echo "--- resize-vm on $k" >&2
	scripts/vm/run.sh --kernel "$k" --disk 3G --timeout "${RESIZE_VM_TIMEOUT:-1500}" -- \
		env TORUS_VM_BIN="$root/.vmbin" "$root/.vmbin/blockdev.test" -test.run '^TestVMResize$' -test.v \
		-test.count=1 -test.timeout 1400s || failed+=("$k")
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "resize-vm: FAILED on ${failed[*]}" >&2
	exit 1
fi
echo "resize-vm: passed on ${kernels[*]}" >&2
