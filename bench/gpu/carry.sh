#!/usr/bin/env bash
# Copies what the lent GPU machine lacks into .carry/ (ignored by git, named in the device tool's
# `carry`): the header-only dependencies (doctest, range-v3, nlohmann-json, CLI11) and Google
# Benchmark's headers and shared library, all from this machine's Debian packages.
# Usage: bench/gpu/carry.sh   (then run bench/gpu/run-gpu.sh there with `carry: [".carry"]`)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
carry=$root/.carry
rm -rf "$carry"
mkdir -p "$carry/include" "$carry/lib"
for d in doctest range meta concepts std nlohmann CLI benchmark; do
  [ -d "/usr/include/$d" ] || { echo "carry.sh: /usr/include/$d missing; run scripts/install-deps.sh" >&2; exit 1; }
  cp -r "/usr/include/$d" "$carry/include/"
done
lib=$(ls /usr/lib/x86_64-linux-gnu/libbenchmark.so.* | head -n 1)
cp "$lib" "$carry/lib/"
ln -sf "$(basename "$lib")" "$carry/lib/libbenchmark.so"
du -sh "$carry" | sed 's/^/carry.sh: /'
