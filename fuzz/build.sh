#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer's coverage instrumentation on the STABLE toolchain:
# the same flags `cargo fuzz build --sanitizer none` passes (SanitizerCoverage needs no
# nightly; only -Zsanitizer does, and we do not use it: safe Rust, panics are the crashes).
# Usage: fuzz/build.sh [target...]   (default: all). Binaries: fuzz/target/<triple>/release/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth \
 -Cdebug-assertions -Coverflow-checks --cfg fuzzing -Clink-dead-code"
bins=()
for t in "$@"; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$triple" "${bins[@]}"
echo "$PWD/target/$triple/release"
