#!/usr/bin/env bash
# The README's test command: installs what is missing (apt as root; the pinned Python virtual
# environment in a cache folder), then
#   1. builds everything with g++ against LibTorch 2.x with CUDA compiled in (the torch wheel of
#      the virtual environment: the primary build) and runs every suite and example;
#   2. builds the libFuzzer targets with clang-16 and runs each briefly;
#   3. builds the streaming tests (test_runtime, test_device) with ASan+UBSan and with TSan
#      against the same LibTorch 2.x and runs them;
#   4. builds the library (every public header), the pure suites and the runtime suite against
#      Debian's LibTorch 1.13 (the supported floor) and runs them.
# It prints one line per suite and closes with "N passed, N failed[, N skipped]", summed from
# doctest's own per-suite counts; GPU cases without a GPU count as skipped, never as passed; a
# sanitizer report is a failed case and a failed exit status. Compiles go through ccache (its cache
# lives outside the checkout and survives between runs on one machine).
#
# Usage: scripts/test.sh [--sanitizers-only]
#   --sanitizers-only  skip the normal build, its tests, the fuzzers and the floor; build and run
#                      only the sanitizer builds (for working on the runtime's thread safety).
# Environment: DISTORCH_BUILD (default build; the other build folders are named after it:
#                ${DISTORCH_BUILD}-fuzz, -asan, -tsan, -floor),
#              DISTORCH_FUZZ_SECONDS (default 20),
#              DISTORCH_JOBS (default 2; LibTorch translation units need ~1.2 GB each),
#              DISTORCH_SANITIZERS (default "asan tsan"; the sanitizer builds to run, "" for none),
#              DISTORCH_FLOOR (default 1; 0 skips the LibTorch 1.13 build),
#              DISTORCH_CACHE (default ~/.cache/distorch: the virtual environment).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

sanitizers_only=0
for arg in "$@"; do
  case $arg in
    --sanitizers-only) sanitizers_only=1 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

bash scripts/install-deps.sh || exit 1
venv=$(bash scripts/install-venv.sh) || { echo "test.sh: could not make the Python virtual environment"; echo "0 passed, 1 failed"; exit 1; }
python=$venv/bin/python
# The primary LibTorch: the torch wheel's own C++ install (include/, lib/, share/cmake/Torch).
torch_dir=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))') \
  || { echo "test.sh: torch does not import from $venv"; echo "0 passed, 1 failed"; exit 1; }
# ccache (Meson uses it when found) in its own folder outside the checkout. Without the working
# folder in the hash, a fresh clone elsewhere (CI) hits what an earlier build compiled.
export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$root
command -v ccache >/dev/null && ccache --max-size=20G >/dev/null
unset Torch_DIR   # each build names its LibTorch explicitly
torch2=(-Dtorch_dir="$torch_dir" -Dcuda=enabled -Dpython="$python")
echo "== LibTorch $("$python" -c 'import torch; print(torch.__version__)') from $torch_dir (primary); Debian's LibTorch 1.13 (floor)"
build=${DISTORCH_BUILD:-build}
fuzz_build=${build}-fuzz
jobs=${DISTORCH_JOBS:-2}
fuzz_seconds=${DISTORCH_FUZZ_SECONDS:-20}
sanitizers=${DISTORCH_SANITIZERS-asan tsan}
status=0
logs=()
step_logs=$(mktemp -d)          # stand-in test logs for steps that failed before running tests
trap 'rm -rf "$step_logs"' EXIT

configure() {  # dir, options...
  local dir=$1; shift
  if [ -f "$dir/build.ninja" ]; then
    meson configure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@" >/dev/null
  fi
}

failed_step() {  # name: one failed case in the summary for a step that produced no test log
  local file="$step_logs/$1-failed.json"
  echo "{\"name\": \"$1\", \"result\": \"FAIL\", \"stdout\": \"\"}" > "$file"
  logs+=("$file")
  status=1
}

elapsed() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }

if [ $sanitizers_only = 0 ]; then
  started=$SECONDS
  echo "== building (g++, $jobs jobs)"
  if ! configure "$build" "${torch2[@]}" -Dtests=true -Dbenchmarks=true -Dexamples=true -Dtools=true; then
    meson setup --wipe "$build" "${torch2[@]}" -Dtests=true -Dbenchmarks=true -Dexamples=true -Dtools=true \
      || { echo "0 passed, 1 failed"; exit 1; }
  fi
  if ! meson compile -C "$build" -j "$jobs"; then
    echo "build failed"; echo "0 passed, 1 failed"; exit 1
  fi
  echo "== running tests"
  meson test -C "$build" --num-processes "$jobs" --print-errorlogs --timeout-multiplier 10 || status=1
  logs+=(--label=g++ "$build/meson-logs/testlog.json")
  echo "== g++ build and tests: $(elapsed $((SECONDS - started)))"

  started=$SECONDS
  echo "== building fuzz targets (clang-16, libFuzzer)"
  logs+=(--label=fuzz)
  if CXX=clang++-16 configure "$fuzz_build" -Dtorch=disabled -Dtests=false -Dbenchmarks=false -Dexamples=false \
       -Dtools=false -Dfuzzers=true -Dfuzz_seconds="$fuzz_seconds" -Dbuildtype=debugoptimized \
     && meson compile -C "$fuzz_build" -j "$jobs"; then
    meson test -C "$fuzz_build" --num-processes 1 --print-errorlogs --timeout-multiplier 10 || status=1
    logs+=("$fuzz_build/meson-logs/testlog.json")
  else
    echo "fuzz build failed"; failed_step fuzz-build
  fi
  echo "== fuzz build and runs: $(elapsed $((SECONDS - started)))"
fi

# ---- sanitizer builds of the streaming tests ---------------------------------------------------
# Only test_runtime and test_device: they hold the code that moves tensors between devices and
# the accounting that other threads touch; every other suite is single-threaded parsing that the
# fuzzers already run under ASan+UBSan. LibTorch itself is not instrumented; none of its frames
# needs a suppression today. One that ever does goes into tests/sanitizers/<tool>.supp, passed on
# below when the file exists, and may name only LibTorch or runtime-library frames, never distorch.
supp=$root/tests/sanitizers
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export LSAN_OPTIONS="print_suppressions=0"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:print_suppressions=0"
for tool in lsan ubsan tsan; do
  if [ -f "$supp/$tool.supp" ]; then
    var=${tool^^}_OPTIONS
    export "$var=${!var}:suppressions=$supp/$tool.supp"
  fi
done

run_sanitizer() {  # name (asan|tsan), -Dsanitize value
  local name=$1 option=$2 dir=${build}-$1 started=$SECONDS wrapper=()
  echo "== building test_runtime and test_device with -fsanitize=$option (g++, $jobs jobs)"
  logs+=(--label="$name")
  # -O1 -g1: sanitizer builds of the LibTorch-heavy test units cost ~4x the CPU of the normal build at
  # -O2 -g; line tables are enough for reports.
  if ! CXX=g++ configure "$dir" "${torch2[@]}" -Dsanitize="$option" -Doptimization=1 -Ddebug=false -Dcpp_args=-g1 -Dtests=true -Dbenchmarks=false -Dexamples=false \
         -Dtools=false -Dfuzzers=false \
     || ! meson compile -C "$dir" -j "$jobs" test_runtime test_device; then
    echo "$name build failed"; failed_step "$name-build"; return
  fi
  # TSan maps its shadow memory at fixed addresses; kernels with more mmap randomisation bits than
  # GCC 12's runtime knows make it die at start ("unexpected memory mapping"). Running without
  # address randomisation avoids that where the sandbox allows it.
  if [ "$name" = tsan ] && setarch "$(uname -m)" -R true 2>/dev/null; then
    wrapper=(--wrapper "setarch $(uname -m) -R")
  fi
  rm -f "$dir"/meson-logs/testlog*.json
  echo "== running runtime and device under $name"
  # --no-rebuild: the folder has only these two executables built; the name list picks their tests.
  meson test -C "$dir" --no-rebuild "${wrapper[@]}" --num-processes "$jobs" --print-errorlogs \
    --timeout-multiplier 10 runtime device || status=1
  # With a wrapper, meson names the log after it (testlog-setarch.json).
  local log
  log=$(ls "$dir"/meson-logs/testlog*.json 2>/dev/null | head -n 1)
  if [ -n "$log" ]; then
    logs+=("$log")
  else
    failed_step "$name-tests"
  fi
  echo "== $name build and tests: $(elapsed $((SECONDS - started)))"
}

for s in $sanitizers; do
  case $s in
    asan) run_sanitizer asan address,undefined ;;
    tsan) run_sanitizer tsan thread ;;
    *) echo "DISTORCH_SANITIZERS: unknown '$s' (asan, tsan)"; failed_step "sanitizer-$s" ;;
  esac
done

# ---- the LibTorch 1.13 floor -----------------------------------------------------------------------
# Debian's libtorch-dev (CPU only, no float8): every public header (the ODR test compiles them all),
# the pure suites and the runtime suite. The pure suites do not include LibTorch, so ccache serves
# them from the primary build.
floor_targets=(tests/core/test_core tests/placement/test_placement tests/io/test_io_pure tests/lora/test_lora_pure
               tests/runtime/test_runtime tests/odr/test_odr tests/cuda/test_cuda)
floor_tests=(core placement io_pure lora_pure runtime odr cuda)
if [ $sanitizers_only = 0 ] && [ "${DISTORCH_FLOOR:-1}" != 0 ]; then
  started=$SECONDS
  dir=${build}-floor
  echo "== building the library, pure and runtime suites against Debian's LibTorch 1.13 (g++, $jobs jobs)"
  logs+=(--label=floor)
  if CXX=g++ configure "$dir" -Dtorch_dir= -Dcuda=disabled -Dpython="$python" -Dtests=true -Dbenchmarks=false \
       -Dexamples=false -Dtools=false -Dfuzzers=false \
     && meson compile -C "$dir" -j "$jobs" "${floor_targets[@]}"; then
    rm -f "$dir"/meson-logs/testlog*.json
    meson test -C "$dir" --no-rebuild --num-processes "$jobs" --print-errorlogs --timeout-multiplier 10 \
      "${floor_tests[@]}" || status=1
    logs+=("$dir/meson-logs/testlog.json")
  else
    echo "floor build failed"; failed_step floor-build
  fi
  echo "== LibTorch 1.13 floor: $(elapsed $((SECONDS - started)))"
fi

echo "== summary"
python3 scripts/summarize-tests.py "${logs[@]}" || status=1
exit $status
