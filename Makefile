# Torus build, test and benchmark entry points. `make test` is what CI runs.
GO       ?= go
BIN      := bin
PKGS     := ./...
FUZZTIME ?= 10s

.PHONY: all build test unit fuzz-smoke lint bench demo clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# Every test: unit and integration tests with real clients (fio, nbdinfo,
# qemu-img, qemu-io), then a short run of every fuzz target.
test: lint
	scripts/deps.sh test
	$(GO) test -count=1 -timeout 20m $(PKGS)
	$(MAKE) fuzz-smoke

# Each fuzz target runs briefly on top of its checked-in corpus.
fuzz-smoke:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  dir=$$($(GO) list -f '{{.Dir}}' $$pkg); \
	  for f in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go 2>/dev/null | sed 's/func //'); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; \
	done

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

# Benchmarks are not tests: tables and ratios against peers measured in the same run.
bench:
	scripts/deps.sh bench
	$(GO) test -run '^$$' -bench . -benchmem ./iouring/ ./engine/ ./nbd/
	$(GO) run ./bench $(BENCHFLAGS)

demo: build
	scripts/deps.sh demo
	scripts/demo.sh

clean:
	rm -rf $(BIN)
