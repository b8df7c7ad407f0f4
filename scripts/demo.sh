#!/usr/bin/env bash
# The demo on a fresh or a set-up machine: installs what is missing
# (scripts/setup.sh, quick when nothing is), builds wanmig in release and runs
# `wanmig demo` (a live migration of the test guest and its disk between two
# processes over loopback QUIC, checked by the guest's oracle). Arguments go
# to `wanmig demo` (e.g. --snapshot).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo run --release --locked -p wanmig --bin wanmig -- demo "$@"
