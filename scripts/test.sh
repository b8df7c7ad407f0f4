#!/usr/bin/env bash
# The whole test suite: lints, unit and property tests, and the integration
# tests that boot the test guest under KVM in real wanmig processes.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo nextest run --workspace --locked --no-fail-fast
