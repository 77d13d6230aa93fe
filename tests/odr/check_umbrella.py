#!/usr/bin/env python3
"""Checks that the umbrella header include/distorch/distorch.hpp includes every public header:
every .hpp under include/distorch (what `meson install` installs) except those in a detail/ folder
and the umbrella itself. It also fails on an umbrella line that names a missing header or a
detail/ one. Prints one line per problem and exits 1 when there is any.

Before checking it proves, on a temporary include tree, that it notices a missing header, so a
reader that has stopped finding includes fails instead of passing.

    check_umbrella.py [--root DIR]
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

UMBRELLA = "distorch/distorch.hpp"
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](distorch/[^>"]+)[>"]', re.M)


def public_headers(include_dir):
    base = include_dir / "distorch"
    return sorted(p.relative_to(include_dir).as_posix() for p in base.rglob("*.hpp")
                  if "detail" not in p.relative_to(base).parts[:-1] and p.relative_to(include_dir).as_posix() != UMBRELLA)


def problems(include_dir):
    umbrella = include_dir / UMBRELLA
    if not umbrella.is_file():
        return [f"{umbrella}: no such file"]
    included = INCLUDE.findall(umbrella.read_text(encoding="utf-8"))
    public = public_headers(include_dir)
    out = [f"include/{UMBRELLA}: does not include public header {h}: add #include \"{h}\""
           for h in public if h not in included]
    for h in included:
        if not (include_dir / h).is_file():
            out.append(f"include/{UMBRELLA}: includes {h}, which does not exist")
        elif "detail" in Path(h).parts[1:-1]:
            out.append(f"include/{UMBRELLA}: includes {h}, a detail header users never include")
    return out


def self_test():
    with tempfile.TemporaryDirectory(prefix="distorch-umbrella-") as d:
        inc = Path(d)
        for h in ("distorch/core/a.hpp", "distorch/lora/b.hpp", "distorch/runtime/detail/c.hpp"):
            (inc / h).parent.mkdir(parents=True, exist_ok=True)
            (inc / h).write_text("#pragma once\n")
        (inc / UMBRELLA).write_text('#pragma once\n#include "distorch/core/a.hpp"\n')
        found = problems(inc)
        if len(found) != 1 or "distorch/lora/b.hpp" not in found[0]:
            print("check_umbrella.py: self-test failed: expected one miss, lora/b.hpp; got: " + ("; ".join(found) or "none"),
                  file=sys.stderr)
            return False
    return True


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=Path(__file__).resolve().parents[2], type=Path, help="repository root")
    args = parser.parse_args(argv)
    if not self_test():
        return 2
    include_dir = args.root / "include"
    found = problems(include_dir)
    for p in found:
        print(p)
    print(f"{len(public_headers(include_dir))} public headers, {len(found)} problems", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
