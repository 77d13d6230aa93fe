#!/usr/bin/env bash
# Long fuzzing session for every target: builds with clang-16 and runs each for SECONDS (default
# 3600) on all cores but one. Crashes land in the build folder as crash-* files.
# Usage: tests/fuzz/fuzz-long.sh [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
seconds=${1:-3600}
build="$root/build-fuzz-long"
[ -f "$build/build.ninja" ] || CXX=clang++-16 meson setup "$build" "$root" -Dtorch=disabled -Dtests=false \
  -Dbenchmarks=false -Dexamples=false -Dtools=false -Dfuzzers=true
meson compile -C "$build" -j 2
for target in "$build"/tests/fuzz/fuzz_*; do
  [ -x "$target" ] || continue
  name=$(basename "$target"); name=${name#fuzz_}
  echo "== $name for ${seconds}s"
  (cd "$build" && "$root/tests/fuzz/run-fuzz.sh" "$target" "$root/tests/fuzz/seeds/$name" "$seconds" -jobs=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 )))
done
