# Torus build, test and benchmark entry points. `make test` is what CI runs.
GO       ?= go
BIN      := bin
PKGS     := ./...
FUZZTIME ?= 10s

.PHONY: all build image test test-faults test-nemesis test-image test-vm test-vm-all vm-kernels vm-check fuzz-smoke lint bench bench-vm demo clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# OCI image archives of torusd and torus-csi in _out/images (static binaries; torus-csi on a
# Debian bookworm root with the ext4 and XFS tools), built by buildah: no daemon, no registry.
image:
	scripts/deps.sh image
	GO=$(GO) scripts/image/build.sh

# Every test: unit and integration tests with real clients (fio, nbdinfo,
# qemu-img, qemu-io), a short run of every fuzz target, the container images
# under podman, then the real-kernel tests in VMs.
test: lint
	scripts/deps.sh test
	$(GO) test -count=1 -timeout 20m $(PKGS)
	$(MAKE) test-faults
	$(MAKE) test-nemesis
	$(MAKE) fuzz-smoke
	$(MAKE) test-image
	$(MAKE) test-vm

# The fault-injection suite: binaries built with the faults
# tag (netquic's fault hook), fio verify before, during and after each fault.
test-faults:
	$(GO) test -tags faults -count=1 -timeout 20m -run '^TestFault' ./cmd/torusblk/ ./netquic/

# The randomized fault test: writers with exact knowledge of every ack, a
# seeded nemesis (node kill and partition, node add and remove, etcd
# restarts, a lost attach lock, kill -9 of the client), and a checker of the
# whole history. NEMESIS_DURATION and NEMESIS_SEED make long or repeated
# runs; the default seed is fixed so that `make test` repeats itself, and
# NEMESIS_SEED=0 draws a new one (printed) to explore.
NEMESIS_DURATION ?= 3m
NEMESIS_SEED     ?= 42
NEMESIS_TIMEOUT  ?= 30m
test-nemesis:
	$(GO) test -tags faults -count=1 -timeout $(NEMESIS_TIMEOUT) -v -run '^TestNemesis' ./cmd/torusblk/ \
		-args -nemesis.duration=$(NEMESIS_DURATION) -nemesis.seed=$(NEMESIS_SEED)

# The images under podman: torusd dev from the torusd image, a volume created by its torusctl and
# served by torusblk from each image, written and read back over NBD (qemu-io, nbdcopy); the
# torus-csi image's filesystem tools.
test-image: image
	scripts/deps.sh test-image
	scripts/image/test.sh

# Real-kernel tests in qemu (TCG): ublk on trixie 6.12 and the newest
# trixie-backports 7.x, the kernel NBD client on bookworm 6.1 (no ublk), and
# torusblk attach/detach/recover end to end on all three, and online resize
# of a mounted ext4 on all three. Kernels are fetched once into ~/.cache/torus-vm.
test-vm: vm-kernels
	UBLK_TEST_RUN='^TestVM(Device|StopByOther|Recovery)$$' ublk/vmtest.sh trixie backports
	RUN='^Test(KernelNetlinkFioVerify|KernelIoctlFioVerify|DisconnectKernel|KernelFilesystem)$$' nbd/vmtest.sh bookworm
	scripts/vm/attach-e2e.sh trixie backports bookworm
	scripts/vm/resize-vm.sh backports bookworm
	scripts/vm/snapshot-e2e.sh trixie bookworm
	scripts/vm/csi-vm.sh trixie bookworm

# test-vm, with the end-to-end tests of resize, snapshots and the CSI
# driver on every kernel (test-vm runs each where it differs: ublk that
# grows live or not, the kernel NBD client).
test-vm-all: test-vm
	scripts/vm/resize-vm.sh trixie
	scripts/vm/snapshot-e2e.sh backports
	scripts/vm/csi-vm.sh backports

vm-kernels:
	scripts/deps.sh vm
	scripts/vm/fetch-kernel.sh trixie
	scripts/vm/fetch-kernel.sh backports
	scripts/vm/fetch-kernel.sh bookworm

# The harness's own check: each kernel boots and has what the tests need.
vm-check: vm-kernels
	scripts/vm/check.sh

# Each fuzz target runs briefly on top of its checked-in corpus.
fuzz-smoke:
	GO=$(GO) FUZZTIME=$(FUZZTIME) scripts/fuzz-smoke.sh

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags faults ./netquic/ ./cmd/torusblk/

# Benchmarks are not tests: tables and ratios against peers measured in the same run.
bench:
	scripts/deps.sh bench
	$(GO) test -run '^$$' -bench . -benchmem ./iouring/ ./store/ ./cluster/ ./nbd/ ./internal/qos/
	$(GO) run ./bench $(BENCHFLAGS)

# Benchmark in the VM: ublk, a loop device and kernel NBD over the same
# backing file, one boot.
bench-vm: vm-kernels
	scripts/vm/bench-vm.sh

demo: build
	scripts/deps.sh demo
	scripts/demo.sh

clean:
	rm -rf $(BIN) _out
