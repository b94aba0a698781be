#!/usr/bin/env bash
# Builds the ublk end-to-end tests (build tag vm) on the host and runs them in
# a TCG VM on each kernel with ublk_drv (scripts/vm/run.sh, one VM at a time).
#
# Usage: ublk/vmtest.sh [trixie] [backports]     (default: both)
#        UBLK_TEST_RUN=REGEXP ublk/vmtest.sh ...  (only matching tests)
# Exits non-zero when any kernel failed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bin=$root/.vmbin
mkdir -p "$bin"
go test -c -tags vm -o "$bin/ublk.test" ./ublk/

kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(trixie backports)
run=()
[ -n "${UBLK_TEST_RUN:-}" ] && run=(-test.run "$UBLK_TEST_RUN")
rc=0
for k in "${kernels[@]}"; do
	echo "== ublk tests on $k"
	scripts/vm/run.sh --kernel "$k" --disk 2G --timeout "${UBLK_VM_TIMEOUT:-1200}" -- \
		"$bin/ublk.test" -test.v -test.count=1 -test.timeout 1100s "${run[@]}" || rc=1
done
exit $rc
