#!/usr/bin/env bash
# Builds the agent of the previous release (the one whose protocol this release still reads and
# writes, version 2) from this repository's history, and runs the end-to-end test of it against
# this release's hub (tests/tests/previous_release.rs): the device one release behind syncs, and
# keeps its outbox and its store across its own upgrade.
# The release is named by its commit below; the next release moves it forward.
set -euo pipefail
cd "$(dirname "$0")/.."
release=aa2db9e
src=target/previous-release/src
if ! git cat-file -e "$release^{commit}" 2>/dev/null; then
    # A shallow clone lacks it: fetch the history from where the clone came from.
    git fetch --quiet --unshallow 2>/dev/null || git fetch --quiet origin 2>/dev/null || true
fi
if ! git cat-file -e "$release^{commit}" 2>/dev/null; then
    echo "error: commit $release (the previous release) is not in this clone's history and could not be fetched" >&2
    exit 1
fi
if [ "$(cat target/previous-release/built 2>/dev/null)" != "$release" ]; then
    rm -rf "$src"
    mkdir -p "$src"
    git archive "$release" | tar -x -C "$src"
    # Its own target directory: its crates share names and paths with this release's.
    cargo build --locked --manifest-path "$src/Cargo.toml" -p larder-agent \
        --target-dir target/previous-release/target
    echo "$release" > target/previous-release/built
fi
LARDER_PREVIOUS_AGENT="$PWD/target/previous-release/target/debug/larder-agent" \
LARDER_PREVIOUS_RELEASE="$release" \
    cargo test -p larder-tests --features previous-release-e2e --test previous_release
