#!/usr/bin/env bash
# The quick-start job: make a small qcow2 with qemu-img (data, a zero cluster,
# a hole, a backing file), then show it with rblock info, map and inspect.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/apt-deps.sh qemu-img:qemu-utils qemu-io:qemu-utils
[ -f dist/src/cli/main.js ] || npm run build
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
qemu-img create -q -f qcow2 "$dir/base.qcow2" 64M
qemu-io -c 'write -P 0xab 0 1M' -c 'write -z 4M 64k' "$dir/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$dir/disk.qcow2"
qemu-io -c 'write -P 0xcd 512k 128k' "$dir/disk.qcow2" >/dev/null
RBLOCK="$PWD/bin/rblock.cjs"
rb() { echo "\$ rblock $*"; node "$RBLOCK" "$@"; echo; }
cd "$dir"
rb info disk.qcow2
rb map disk.qcow2
rb map --output json disk.qcow2
rb read disk.qcow2 --offset 640K --length 32 --hexdump
rb inspect disk.qcow2 --l1
