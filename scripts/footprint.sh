#!/usr/bin/env bash
# The agent's footprint, one command: the stripped aarch64 binary's size (cross-built with
# Debian's gcc toolchain, see scripts/cross-build.sh), then the agent's resident memory idle and
# under 100 sales/s, and a simulated year at one fridge (tests/src/bin/larder-footprint.rs).
# Arguments go to larder-footprint: e.g. `scripts/footprint.sh year --days 30`.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v aarch64-linux-gnu-gcc >/dev/null; then
    scripts/cross-build.sh aarch64-unknown-linux-gnu | tail -1
else
    echo "aarch64 binary size: skipped (install gcc-aarch64-linux-gnu to measure it)"
fi
cargo build --release --locked -p larder-tests --bins
# The agent as shipped (the `device` profile), for this machine, for the memory figures.
cargo build --profile device --locked -p larder-agent
LARDER_AGENT_BIN=target/device/larder-agent target/release/larder-footprint "${@:-all}"
