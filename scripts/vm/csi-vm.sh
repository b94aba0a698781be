#!/usr/bin/env bash
# The CSI node service on real kernels (cmd/torus-csi/vm_test.go, build tag vm), one VM per kernel:
# csi-sanity with every spec against torus-csi and torusd dev as real processes (devices with ublk
# where the kernel has it, else the kernel NBD client; mount and block access), a volume that follows
# its pod between two plugins standing for two hosts (FAILED_PRECONDITION while the other serves, the
# dead host's lease waited out and fenced), a plugin killed during fio verify=crc32c (and, with ublk,
# its device server too), and data through a snapshot, a clone on xfs and expansion.
#
# Usage: scripts/vm/csi-vm.sh [trixie] [backports] [bookworm]   (default: trixie bookworm)
# CSI_VM_RUN selects tests (a -test.run pattern; default all). Exits non-zero when any kernel failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(trixie bookworm)
mkdir -p .vmbin
for b in torusd torusctl torusblk torus-csi; do go build -o ".vmbin/$b" "./cmd/$b"; done
go test -c -tags vm -o .vmbin/torus-csi.test ./cmd/torus-csi/
failed=()
for k in "${kernels[@]}"; do
	echo "--- csi-vm on $k" >&2
	start=$(date +%s)
	scripts/vm/run.sh --kernel "$k" --mem 3G --disk 4G --timeout "${CSI_VM_TIMEOUT:-2400}" -- \
		env TORUS_VM_BIN="$root/.vmbin" "$root/.vmbin/torus-csi.test" -test.run "${CSI_VM_RUN:-^TestVM}" -test.v \
		-test.count=1 -test.timeout 2300s || failed+=("$k")
	echo "--- csi-vm on $k took $(($(date +%s) - start)) s" >&2
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "csi-vm: FAILED on ${failed[*]}" >&2
	exit 1
fi
echo "csi-vm: passed on ${kernels[*]}" >&2
