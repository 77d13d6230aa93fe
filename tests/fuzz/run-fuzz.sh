#!/usr/bin/env bash
# Runs one libFuzzer target for a bounded time: new inputs go to a scratch corpus in the build
# folder, the committed seeds are only read. Usage: run-fuzz.sh TARGET SEED_DIR SECONDS [extra libFuzzer flags]
set -euo pipefail
target=$1 seeds=$2 seconds=$3; shift 3
scratch="$(dirname "$target")/corpus-$(basename "$target")"
mkdir -p "$scratch"
dirs=("$scratch")
[ -d "$seeds" ] && dirs+=("$seeds")
exec "$target" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "$@" "${dirs[@]}"
