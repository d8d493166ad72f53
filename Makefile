# Spillway: one command for the demo, one for the whole test suite. Both install their own
# apt and npm dependencies (scripts/setup.sh), idempotently.
.PHONY: demo demo-edge test deps build native lint typecheck unit bench bench-boot clean

NATIVE := build/Release/spillway_native.node
# Build the addon against the installed Node's headers when the distribution ships them
# (Debian/NodeSource: /usr/include/node), so nothing is downloaded whatever ~/.npmrc says.
NODEDIR ?= $(shell d=$$(dirname $$(dirname $$(command -v node))); [ -f $$d/include/node/node_api.h ] && echo $$d)

demo: build
	bash scripts/demo.sh

# The edge on its own, step by step (serve, NBD clients, a VM, two edges, write-back).
demo-edge: build
	bash scripts/demo-edge.sh

test: build lint
	node scripts/run-tests.mjs

deps:
	bash scripts/setup.sh

native: $(NATIVE)

$(NATIVE): native/spillway_native.c binding.gyp
	npm run build:native -- $(if $(NODEDIR),--nodedir=$(NODEDIR))

build: deps
	$(MAKE) --no-print-directory native
	npm run build

typecheck: deps
	npm run typecheck

lint: typecheck
	npm run lint

bench: build
	npx tsx bench/nbd.ts
	npx tsx bench/writeback.ts

# The time-to-running headline (about 15 minutes: copy-first moves 1.2 GiB at 20 Mbit/s).
bench-boot: build
	npx tsx bench/boot.ts

clean:
	rm -rf dist build .work
