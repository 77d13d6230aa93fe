#!/usr/bin/env bash
# The README's test command: installs what is missing (as root), builds everything with g++,
# runs every suite, builds the libFuzzer targets with clang-16 and runs each briefly, then prints
# one closing line "N passed, N failed" summed from doctest's own per-suite counts.
#
# Environment: DISTORCH_BUILD (default build), DISTORCH_FUZZ_SECONDS (default 20),
#              DISTORCH_JOBS (default 2; LibTorch translation units need ~1.2 GB each).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/install-deps.sh || exit 1
build=${DISTORCH_BUILD:-build}
fuzz_build=${build}-fuzz
jobs=${DISTORCH_JOBS:-2}
fuzz_seconds=${DISTORCH_FUZZ_SECONDS:-20}
status=0

configure() {  # dir, options...
  local dir=$1; shift
  if [ -f "$dir/build.ninja" ]; then
    meson configure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@" >/dev/null
  fi
}

echo "== building (g++, $jobs jobs)"
if ! configure "$build" -Dtests=true -Dbenchmarks=true -Dexamples=true -Dtools=true; then
  meson setup --wipe "$build" -Dtests=true || { echo "0 passed, 1 failed"; exit 1; }
fi
if ! meson compile -C "$build" -j "$jobs"; then
  echo "build failed"; echo "0 passed, 1 failed"; exit 1
fi
echo "== running tests"
meson test -C "$build" --num-processes "$jobs" --print-errorlogs --timeout-multiplier 10 || status=1

logs=("$build/meson-logs/testlog.json")
echo "== building fuzz targets (clang-16, libFuzzer)"
if CXX=clang++-16 configure "$fuzz_build" -Dtorch=disabled -Dtests=false -Dbenchmarks=false -Dexamples=false \
     -Dtools=false -Dfuzzers=true -Dfuzz_seconds="$fuzz_seconds" -Dbuildtype=debugoptimized \
   && meson compile -C "$fuzz_build" -j "$jobs"; then
  meson test -C "$fuzz_build" --num-processes 1 --print-errorlogs --timeout-multiplier 10 || status=1
  logs+=("$fuzz_build/meson-logs/testlog.json")
else
  echo "fuzz build failed"; status=1
  echo '{"name": "fuzz-build", "result": "FAIL", "stdout": ""}' > "$build/fuzz-build-failed.json"
  logs+=("$build/fuzz-build-failed.json")
fi

python3 scripts/summarize-tests.py "${logs[@]}" || status=1
exit $status
