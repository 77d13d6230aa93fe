#!/usr/bin/env bash
# Makes (or reuses) the pinned Python virtual environment of scripts/requirements-torch.txt in a
# cache folder outside the checkout, and prints its path on stdout. The torch wheel in it is the
# primary LibTorch (2.x, with CUDA); the other packages are the tests' reference implementations.
#
# Environment: DISTORCH_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/distorch),
#              DISTORCH_PYTHON (default python3: the interpreter the environment is made from).
# The environment is rebuilt whenever the requirements or constraints change (a stamp holds their hash).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
requirements=$root/scripts/requirements-torch.txt
constraints=$root/scripts/constraints-torch.txt
cache=${DISTORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distorch}
torch_pin=$(sed -n 's/^torch==\(.*\)$/\1/p' "$requirements")
venv=$cache/venv-torch-$torch_pin
stamp=$venv/.distorch-requirements
want=$(cat "$requirements" "$constraints" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv"
  exit 0
fi
python=${DISTORCH_PYTHON:-python3}
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "install-venv.sh: '$python' cannot make virtual environments; install python3-venv (scripts/install-deps.sh does)" >&2
  exit 1
fi
mkdir -p "$cache"
echo "install-venv.sh: making $venv (torch $torch_pin and the reference packages; a few GB, once)" >&2
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" -c "$constraints" >&2
echo "$want" > "$stamp"
echo "$venv"
