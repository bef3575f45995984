# Developer shortcuts. CI has its own script (.ci/); these only save typing.

GO ?= go

.PHONY: all build vet test bench bench-quick

all: build vet

build:
	$(GO) build ./...

vet:
	$(GO) vet ./...

test:
	$(GO) test ./...

# End-to-end benchmark: both floors, pcpd and miniupnpd under the same pcpload
# scenarios in a throwaway lab (needs root; about 14-15 minutes: the closed loops
# run in 5 rounds, --rounds). Reproduces the
# table in BENCHMARKS.md "End to end (pcpload)". BENCH_ARGS go to the driver.
bench:
	./bench/run $(BENCH_ARGS)

# A shorter pass: 2-s runs, 3 rounds, without the 100 000 / 1 000 000
# lease figures.
bench-quick:
	./bench/run --duration 2s --rounds 3 --scale=false $(BENCH_ARGS)
