#!/usr/bin/env bash
# The whole test suite on a fresh or a set-up machine: installs what is
# missing (scripts/setup.sh, quick when nothing is), then lints, unit and
# property tests, bounded fuzzing, and the integration tests that boot the
# test guest under KVM in real wanmig processes.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
cargo nextest run --workspace --locked --no-fail-fast
