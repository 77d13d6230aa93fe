#!/usr/bin/env bash
# For several developers (or agents) sharing one small machine: runs a compile command in one of
# two global slots, so no more than two compile jobs run at once machine-wide.
# Usage: scripts/dev-compile.sh meson compile -C BUILD_DIR -j1 [TARGET...]
set -u
while true; do
  for slot in 1 2; do
    flock -n -E 200 "/tmp/distorch-compile-slot$slot.lock" "$@"
    rc=$?
    [ $rc -ne 200 ] && exit $rc
  done
  sleep 2
done
