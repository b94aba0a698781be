#!/usr/bin/env bash
# Runs the kernel NBD attach tests (nbd/kernel_vm_test.go, build tag vm) in a VM on real
# Debian kernels: bookworm (6.1, no ublk: the kernel NBD fallback case) and trixie by default.
#
# Usage: nbd/vmtest.sh [bookworm] [trixie] [backports]   (env: RUN=regexp to pick tests,
#        TORUS_NBD_PERF_SECONDS=N for the fio measurement, default 8,
#        TORUS_NBD_PERF_CONNS="1 4" for the connection counts it measures, default 4)
#
# The test binary is built on the host into .vmbin/ (the guest's /tmp is a fresh tmpfs and its
# root is the host's, read-only); the guest runs it as root with /mnt/disk (ext4, O_DIRECT) for
# the volume stores. Exits non-zero when any kernel failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(bookworm trixie)
run=${RUN:-'^Test(Kernel|DisconnectKernel)'}

mkdir -p .vmbin
go test -c -tags vm -o .vmbin/nbd.test ./nbd/

failed=()
for k in "${kernels[@]}"; do
	echo "--- nbd/vmtest.sh: $k" >&2
	if ! scripts/vm/run.sh --kernel "$k" --disk 2G --timeout 1200 -- \
		env TORUS_NBD_PERF_SECONDS="${TORUS_NBD_PERF_SECONDS:-8}" TORUS_NBD_PERF_CONNS="${TORUS_NBD_PERF_CONNS:-4}" \
		.vmbin/nbd.test -test.run "$run" -test.v -test.count 1 -test.timeout ${TEST_TIMEOUT:-18m}; then
		failed+=("$k")
	fi
done
if [ ${#failed[@]} -gt 0 ]; then
	echo "nbd/vmtest.sh: FAILED on ${failed[*]}" >&2
	exit 1
fi
echo "nbd/vmtest.sh: passed on ${kernels[*]}" >&2
