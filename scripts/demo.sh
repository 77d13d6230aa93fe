#!/usr/bin/env bash
# The README's demo command: installs what is missing (apt as root; the pinned Python virtual
# environment whose torch wheel is the primary LibTorch 2.x), builds the quickstart example against
# that LibTorch and runs it. On a machine without GPUs the devices are simulated: a compute device
# too small for the model plus CPU RAM.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh
venv=$(bash scripts/install-venv.sh)
torch_dir=$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$root
build=${DISTORCH_BUILD:-build}
options=(-Dtorch_dir="$torch_dir" -Dpython="$venv/bin/python")
if [ -f "$build/build.ninja" ]; then
  meson configure "$build" "${options[@]}" >/dev/null
else
  meson setup "$build" "${options[@]}" -Dtests=false -Dbenchmarks=false -Dfuzzers=false >/dev/null
fi
meson compile -C "$build" -j "${DISTORCH_JOBS:-2}" quickstart >/dev/null
exec "$build/examples/quickstart" "$@"
