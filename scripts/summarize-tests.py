#!/usr/bin/env python3
"""Sums test cases over meson test logs and prints one line per suite, then the closing line
"N passed, N failed".

Usage: summarize-tests.py [--label=NAME] testlog.json [[--label=NAME] testlog.json ...]
A --label applies to the logs after it; it names the build a suite ran in (g++, fuzz, asan, tsan),
because the sanitizer builds run suites that have the same names as the normal build's.

A doctest suite counts as the test cases doctest itself reports passed and failed. A suite that
died before doctest printed its counts counts as one failed case. Any other test (a fuzz run, a
consumer build) counts as one case, passed or failed by its exit status. A sanitizer report in a
test's output is a failure even where the exit status says otherwise (UBSan, for one, goes on
after a report unless told to halt), so the report can never pass unnoticed. Exits 1 if anything
failed, so the counts and the exit status always agree.
"""
import json
import re
import sys

DOCTEST = re.compile(r"\[doctest\] test cases:\s*(\d+)\s*\|\s*(\d+) passed\s*\|\s*(\d+) failed\s*\|\s*(\d+) skipped")
# The first line of every report the GCC/Clang sanitizer runtimes print.
SANITIZER = re.compile(
    r"^==\d+==ERROR: (?:AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer)"
    r"|^WARNING: ThreadSanitizer:"
    r"|^ThreadSanitizer: "
    r"|^\S+:\d+:\d+: runtime error: ",
    re.MULTILINE)


def main(argv):
    passed = failed = skipped = 0
    rows = []
    label = ""
    for arg in argv:
        if arg.startswith("--label="):
            label = arg[len("--label="):]
            continue
        with open(arg, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                entry = json.loads(line)
                p, fl, s, note = count(entry)
                passed += p
                failed += fl
                skipped += s
                rows.append((label, entry.get("name", "?"), p, fl, s, note))
    if rows:
        lw = max(len(r[0]) for r in rows)
        nw = max(len(r[1]) for r in rows)
        for lab, name, p, fl, s, note in rows:
            text = (f"{lab:<{lw}}  " if lw else "") + f"{name:<{nw}}  {p:>4} passed, {fl} failed"
            if s:
                text += f", {s} skipped"
            if note:
                text += f"  ({note})"
            print(text)
    line = f"{passed} passed, {failed} failed"
    if skipped:
        line += f", {skipped} skipped"
    print(line)
    return 1 if failed else 0


def count(entry):
    """(passed, failed, skipped, note) for one meson test entry."""
    result = entry.get("result")
    ok = result in ("OK", "EXPECTEDFAIL")
    out = (entry.get("stdout") or "") + "\n" + (entry.get("stderr") or "")
    report = SANITIZER.search(out)
    found = DOCTEST.findall(out)
    note = ""
    if report:
        end = out.find("\n", report.start())
        note = "sanitizer report: " + out[report.start():end if end >= 0 else None].strip()[:100]
    elif not ok and result != "SKIP":
        note = result if entry.get("returncode") is None else f"{result}, exit status {entry['returncode']}"
    if found:
        _, p, fl, s = map(int, found[-1])
        # Crashed after printing, or a sanitizer report at exit (leaks, TSan's exit code).
        if (not ok or report) and fl == 0:
            fl += 1
        return p, fl, s, note
    if result == "SKIP":
        return 0, 0, 1, note
    if ok and not report:
        return 1, 0, 0, note
    return 0, 1, 0, note


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
