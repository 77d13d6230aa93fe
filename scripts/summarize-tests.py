#!/usr/bin/env python3
"""Sums test cases over meson test logs and prints the closing line "N passed, N failed".

A doctest suite counts as the test cases doctest itself reports passed and failed. A suite that
died before doctest printed its counts counts as one failed case. Any other test (a fuzz run, a
consumer build) counts as one case, passed or failed by its exit status. Exits 1 if anything
failed, so the counts and the exit status always agree.
"""
import json
import re
import sys

DOCTEST = re.compile(r"\[doctest\] test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed\s*\|\s*(\d+) skipped")

passed = failed = skipped = 0
for path in sys.argv[1:]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            entry = json.loads(line)
            ok = entry.get("result") in ("OK", "EXPECTEDFAIL")
            found = DOCTEST.findall(entry.get("stdout", "") or "")
            if found:
                _, p, fl, s = map(int, found[-1])
                passed += p
                failed += fl
                skipped += s
                if not ok and fl == 0:  # crashed after printing, or a sanitizer report at exit
                    failed += 1
            elif entry.get("result") == "SKIP":
                skipped += 1
            elif ok:
                passed += 1
            else:
                failed += 1
line = f"{passed} passed, {failed} failed"
if skipped:
    line += f", {skipped} skipped"
print(line)
sys.exit(1 if failed else 0)
