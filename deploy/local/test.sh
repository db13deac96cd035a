#!/usr/bin/env bash
# The whole test suite: formatting, lints, docs, then every test (unit tests,
# openraft's storage suite, and the tests that run real node processes).
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ensure_prerequisites
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
cd "$ROOT"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
profile=default
[ "${CI:-}" = true ] && profile=ci
# The tests start the real binaries (mailvault-node, mailvault-admin), which
# `cargo test` builds only for the package they belong to: build them all.
cargo build --workspace --bins --quiet
cargo nextest run --workspace --profile "$profile"
