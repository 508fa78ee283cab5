# cape-static-ip: `make run` starts everything locally, `make test` runs every test.
SHELL := /bin/bash
include hack/controlplane/cluster.mk
include hack/release.mk
include hack/bench.mk

.PHONY: all build run test lint fmt clean fuzz fuzz-replay

all: build

build:
	cargo build --bin cape-static-ip

## run: the webhook against the configured cluster, or a local control plane when none.
run: controlplane
	@bash hack/run.sh

## test: lint, unit tests, then integration tests on a real kube-apiserver + etcd (and
## metal3's IPAM controller and kube-controller-manager), all built from their Go modules on
## first use.
test: controlplane
	@python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
	@bash hack/controlplane/build.sh --metal3 >/dev/null
	@bash hack/controlplane/build.sh --promtool >/dev/null
	@bash hack/controlplane/build.sh --clusterctl >/dev/null
	@bash hack/controlplane/build.sh --controller-manager >/dev/null
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo test --lib --bins --tests -- --test-threads=4

## fuzz: each libFuzzer target (fuzz/) for FUZZ_TIME seconds (default 600), one after the
## other on one core; stable toolchain, no cargo-fuzz needed. README, "Fuzzing".
FUZZ_TIME ?= 600
fuzz:
	FUZZ_TIME=$(FUZZ_TIME) bash fuzz/run.sh $(FUZZ_TARGETS)

## fuzz-replay: every input of the committed corpus once, through the instrumented targets.
fuzz-replay:
	FUZZ_REPLAY=1 bash fuzz/run.sh $(FUZZ_TARGETS)

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf .dev out
