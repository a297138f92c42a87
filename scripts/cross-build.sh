#!/usr/bin/env bash
# Builds a release agent for a fridge or POS board with Debian's gcc cross toolchain, no Docker.
#
#   scripts/cross-build.sh aarch64-unknown-linux-gnu     # 64-bit ARM boards
#   scripts/cross-build.sh armv7-unknown-linux-gnueabihf # 32-bit ARM boards with hard float
#
# Needs: `rustup target add TARGET` and the Debian package for the target's gcc
# (gcc-aarch64-linux-gnu or gcc-arm-linux-gnueabihf). The stripped binary is written to
# target/TARGET/device/larder-agent; its size and the newest glibc symbol version it needs
# are printed at the end. Run it on the board, or here with `qemu-aarch64 -L /usr/aarch64-linux-gnu`.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
case "$target" in
aarch64-unknown-linux-gnu) triple=aarch64-linux-gnu ;;
armv7-unknown-linux-gnueabihf) triple=arm-linux-gnueabihf ;;
*)
    echo "usage: $0 aarch64-unknown-linux-gnu|armv7-unknown-linux-gnueabihf" >&2
    exit 2
    ;;
esac

if ! command -v "$triple-gcc" >/dev/null; then
    echo "error: $triple-gcc not found; install it with: apt-get install gcc-$triple" >&2
    exit 1
fi
if ! rustup target list --installed | grep -qx "$target"; then
    echo "error: Rust target $target is not installed; run: rustup target add $target" >&2
    exit 1
fi

env_target="${target//-/_}"
export "CC_${env_target}=$triple-gcc"
export "AR_${env_target}=$triple-ar"
cargo build --profile device --locked -p larder-agent --target "$target"

bin="target/$target/device/larder-agent"
"$triple-strip" "$bin"
size=$(stat -c %s "$bin")
glibc=$("$triple-objdump" -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)
echo "built $bin: $size bytes stripped, needs glibc ${glibc#GLIBC_} or newer"
