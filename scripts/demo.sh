#!/usr/bin/env bash
# The README's demo command: installs what is missing (as root), builds the quickstart example
# and runs it. On a machine without GPUs the devices are simulated: a compute device too small
# for the model plus CPU RAM.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
build=${DISTORCH_BUILD:-build}
if [ ! -f "$build/build.ninja" ]; then
  meson setup "$build" -Dtests=false -Dbenchmarks=false -Dfuzzers=false >/dev/null
fi
meson compile -C "$build" -j "${DISTORCH_JOBS:-2}" quickstart >/dev/null
exec "$build/examples/quickstart" "$@"
