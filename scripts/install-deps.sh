#!/usr/bin/env bash
# Installs every Debian bookworm package distorch's build, tests, demo and fuzzers need.
# As root it runs apt-get for whatever is missing; otherwise it lists what is missing and stops.
set -euo pipefail
packages=(
  g++ meson ninja-build cmake pkg-config
  libtorch-dev libopenblas0 libgloo-dev
  doctest-dev librange-v3-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev
  clang-16 libclang-rt-16-dev
  python3 python3-venv python3-torch ccache
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "distorch: missing packages: ${missing[*]}" >&2
  echo "distorch: run this script as root, or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "distorch: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
