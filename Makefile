# Two commands do everything on a fresh machine: `make run` and `make test` (see README).
CARGO   ?= cargo
GUEST   := target/wasm32-wasip2/guest/guest.wasm
HARNESS := target/release/harness
RULES   ?= examples/rules.conf
# The throwaway server; the example rules take their pool's server from these (libpq's variables).
export PGHOST ?= 127.0.0.1
export PGPORT ?= 15432

HOSTILE := target/wasm32-wasip2/guest/hostile_guest.wasm

.PHONY: prerequisites build guest test-guests host broker proxy mosquitto-up mosquitto-down pg-up pg-down run test bench clean

build: guest host

## What the other targets need (the Rust target, PostgreSQL, openssl), installed where missing.
prerequisites:
	scripts/prerequisites.sh

## The extension: a WebAssembly component.
guest: prerequisites
	$(CARGO) build -p guest --target wasm32-wasip2 --profile guest

## Misbehaving extensions for the sandbox tests.
test-guests:
	$(CARGO) build -p hostile-guest --target wasm32-wasip2 --profile guest

## Everything native (harness, broker, bench, and the tests), in one build that `make run`,
## `make broker`, `make bench` and `make test` share: cargo resolves dependencies' features per
## set of packages built, so building fewer packages here would build wasmtime, tokio and
## rustls a second time for the tests.
NATIVE := --release --workspace --exclude guest --exclude hostile-guest
host:
	$(CARGO) build $(NATIVE) --all-targets

## The MQTT broker with the example extension and rules (examples/broker.toml) on the local
## PostgreSQL, listening on 127.0.0.1:1883 until Ctrl-C.
broker: guest host pg-up
	target/release/broker --config examples/broker.toml --migrate

## The proxy with the example extension and rules (examples/proxy.toml) on the local PostgreSQL,
## in front of a throwaway Mosquitto on 127.0.0.1:1885 (scripts/mosquitto.sh), listening on
## 127.0.0.1:1884 until Ctrl-C. `make mosquitto-down` stops the Mosquitto.
proxy: guest host pg-up mosquitto-up
	target/release/proxy --config examples/proxy.toml --migrate

mosquitto-up: prerequisites
	scripts/mosquitto.sh up

mosquitto-down:
	scripts/mosquitto.sh down

## A throwaway PostgreSQL under target/pg, on 127.0.0.1:$(PGPORT).
pg-up: prerequisites
	scripts/pg.sh up

pg-down:
	scripts/pg.sh down

## The seed's flow (examples/seed.jsonl) with the example rules, on a clean `mqtt` database.
run: build pg-up
	scripts/pg.sh fresh
	$(HARNESS) migrate --module $(GUEST) --rules $(RULES)
	$(HARNESS) run --module $(GUEST) --rules $(RULES) --scenario examples/seed.jsonl

## Unit tests of every crate, the guest's natively; integration tests against the real server.
test: guest test-guests host pg-up
	$(CARGO) test --release -p guest --lib
	GUEST_WASM=$(abspath $(GUEST)) HOSTILE_WASM=$(abspath $(HOSTILE)) $(CARGO) test $(NATIVE)

## Figures for BENCHMARKS.md. Run on a quiet machine, never during a build (dirty pages being
## flushed make synchronous commits 5-20x slower): `sync` first.
bench: guest host pg-up
	sync
	target/release/bench $(BENCH_ARGS)

clean: pg-down mosquitto-down
	rm -rf target
