# Benchmarks (figures, not assertions). Included from the top-level Makefile.
#   make bench            allocator micro-benchmarks (criterion), then the end-to-end benchmark
#                         on its own local control plane: ONE table on stdout, JSON in
#                         target/bench/latest.json (and target/bench/bench-<unix time>.json)
#   make bench-allocator  only the criterion micro-benchmarks
#   make bench-e2e        only the end-to-end benchmark
#   make bench-relist     only the webhook's steady and peak (relist) RSS at 100,000 IPAM objects
#                         and at BENCH_MEM_OBJECTS when larger (e.g. 300000): BENCH_ONLY=relist
# Knobs (environment): BENCH_MEM_OBJECTS (100000), BENCH_PREFILL (60000),
# BENCH_FILL_BUDGET_SECS (240: time allowed for creating objects; the rest is extrapolated).

.PHONY: bench bench-allocator bench-e2e bench-relist

bench: bench-allocator bench-e2e

bench-allocator:
	cargo bench --bench allocator

bench-e2e: controlplane
	cargo build --release --bin cape-static-ip --example bench
	./target/release/examples/bench

bench-relist: controlplane
	cargo build --release --bin cape-static-ip --example bench
	BENCH_ONLY=relist ./target/release/examples/bench
