#!/usr/bin/env bash
# Cross-builds the agent for aarch64 and runs the end-to-end test that drives that binary under
# qemu-aarch64 against an x86 hub (tests/tests/arm_agent.rs).
# Needs: gcc-aarch64-linux-gnu, qemu-user, `rustup target add aarch64-unknown-linux-gnu`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/cross-build.sh aarch64-unknown-linux-gnu
cargo test --locked -p larder-tests --features arm-e2e --test arm_agent
